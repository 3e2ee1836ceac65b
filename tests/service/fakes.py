"""A stand-in for the Engine with the same facade (methods returning concurrent futures, run in order on one
worker thread), so service and API tests run in milliseconds and can hold work back to observe ordering."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.types import (
    AdamParams,
    EngineUserError,
    ForwardBackwardResult,
    SampledSequence,
    SampleJob,
    SampleResult,
    TrainDatum,
)


@dataclass
class _Cfg:
    arch: str = "llama"
    vocab_size: int = 384


class FakeEngine:
    vocab_size = 384
    max_context = 256

    def __init__(self) -> None:
        self.model_config = _Cfg()
        self.calls: list[tuple[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.runs: dict[str, dict[str, Any]] = {}  # run -> {"spec", "steps"}
        self.adapters: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-engine")

    def _call(self, name: str, arg: Any, fn: Callable[[], Any]) -> Future:
        self.calls.append((name, arg))

        def run() -> Any:
            self.gate.wait()
            return fn()

        return self._pool.submit(run)

    def _run(self, run_id: str) -> dict[str, Any]:
        if run_id not in self.runs:
            raise EngineUserError(f"unknown training run {run_id!r}")
        return self.runs[run_id]

    def create_adapter(self, run_id: str, spec: LoraSpec, seed: int | None) -> Future:
        def go() -> None:
            if run_id in self.runs:
                raise EngineUserError(f"training run {run_id!r} already exists")
            self.runs[run_id] = {"spec": spec, "steps": 0}

        return self._call("create", run_id, go)

    def forward_backward(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict,
                         forward_only: bool) -> Future:
        def go() -> ForwardBackwardResult:
            run = self._run(run_id)
            if loss_fn not in ("cross_entropy", "importance_sampling", "ppo"):
                raise EngineUserError(f"loss_fn {loss_fn!r} is not supported")
            outs = [{"logprobs": np.full(d.inputs["target_tokens"].shape, -1.0 - run["steps"], np.float32),
                     "elementwise_loss": np.zeros(d.inputs["target_tokens"].shape, np.float32)} for d in data]
            return ForwardBackwardResult(outputs=outs, metrics={"loss:sum": float(len(data)) / (1 + run["steps"])})

        return self._call("forward_backward", (run_id, len(data)), go)

    def optim_step(self, run_id: str, params: AdamParams) -> Future:
        def go() -> dict[str, float]:
            self._run(run_id)["steps"] += 1
            return {"grad_norm:mean": 1.0}

        return self._call("optim_step", run_id, go)

    def save_adapter(self, run_id: str, out_dir: Path, with_optimizer: bool) -> Future:
        def go() -> int:
            run = self._run(run_id)
            out_dir.mkdir(parents=True, exist_ok=True)
            spec: LoraSpec = run["spec"]
            (out_dir / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "r": spec.rank, "lora_alpha": spec.alpha,
                 "target_modules": spec.target_module_names(), "steps": run["steps"]}))
            (out_dir / "adapter_model.safetensors").write_bytes(b"weights-%d" % run["steps"])
            if with_optimizer:
                (out_dir / "optimizer_state.safetensors").write_bytes(b"adam")
            return 1

        return self._call("save", run_id, go)

    def load_adapter(self, run_id: str, src_dir: Path, with_optimizer: bool) -> Future:
        def go() -> LoraSpec:
            if run_id in self.runs:
                raise EngineUserError(f"training run {run_id!r} already exists")
            cfg = json.loads((src_dir / "adapter_config.json").read_text())
            if with_optimizer and not (src_dir / "optimizer_state.safetensors").exists():
                raise EngineUserError("this checkpoint has no optimizer state")
            spec = LoraSpec(rank=cfg["r"])
            self.runs[run_id] = {"spec": spec, "steps": cfg.get("steps", 0)}
            return spec

        return self._call("load", run_id, go)

    def drop_adapter(self, run_id: str) -> Future:
        return self._call("drop", run_id, lambda: self.runs.pop(run_id, None))

    def publish_to_sampler(self, run_id: str, adapter_key: str) -> Future:
        def go() -> None:
            self.adapters[adapter_key] = ("memory", self._run(run_id)["steps"])

        return self._call("publish", adapter_key, go)

    def register_checkpoint(self, adapter_key: str, src_dir: Path) -> Future:
        def go() -> None:
            cfg = json.loads((src_dir / "adapter_config.json").read_text())
            self.adapters[adapter_key] = ("disk", cfg.get("steps", 0))

        return self._call("register", adapter_key, go)

    def sample(self, job: SampleJob) -> Future:
        def go() -> SampleResult:
            if job.adapter_key is not None and job.adapter_key not in self.adapters:
                raise EngineUserError(f"unknown adapter {job.adapter_key!r}")
            steps = self.adapters[job.adapter_key][1] if job.adapter_key else 0
            seqs = [SampledSequence(tokens=[steps % 384, 7][: job.max_tokens], logprobs=[-0.5, -0.25][: job.max_tokens],
                                    stop_reason="length") for _ in range(job.num_samples)]
            return SampleResult(sequences=seqs)

        return self._call("sample", job.adapter_key, go)

    def stats(self) -> dict[str, Any]:
        return {"runs": len(self.runs), "queued_jobs": self._pool._work_queue.qsize()}

    def shutdown(self) -> None:
        self.gate.set()
        self._pool.shutdown(wait=True)
