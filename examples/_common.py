"""What every example shares: the command line (--url, --model, --api-key, --quick), the server's model and
device, chat conversations rendered into training data, and a stopwatch. Every figure an example prints is
measured in that run."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"),
                   help="server or router URL (default: $TINKER_BASE_URL or http://127.0.0.1:8000)")
    p.add_argument("--model", default=None, help="base model name (default: the one the server serves)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $TINKER_API_KEY, else data/first-api-key, else tml-local for --no-auth)")
    p.add_argument("--quick", action="store_true", help="a few seconds on a tiny model (what CI runs)")
    return p


def api_key(args: argparse.Namespace) -> str:
    if args.api_key:
        return args.api_key
    if os.environ.get("TINKER_API_KEY"):
        return os.environ["TINKER_API_KEY"]
    if os.path.exists("data/first-api-key"):
        return open("data/first-api-key").read().strip()
    return "tml-local"  # a server started with --no-auth accepts any tml- key


def server_info(args: argparse.Namespace) -> dict[str, Any]:
    """The served model and where it runs (GET /get_server_capabilities)."""
    r = httpx.get(args.url.rstrip("/") + "/get_server_capabilities", headers={"X-API-Key": api_key(args)},
                  timeout=30)
    r.raise_for_status()
    info = r.json()
    info.setdefault("model_name", info["supported_models"][0]["model_name"])
    return info


def base_model(args: argparse.Namespace) -> str:
    return args.model or server_info(args)["model_name"]


def service_client(args: argparse.Namespace):
    import tinker

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    return tinker.ServiceClient(base_url=args.url, api_key=api_key(args))


def conversation_datum(tokenizer: Any, user: str, assistant: str):
    """A tinker Datum that teaches `assistant` as the reply to `user`: the model's chat template renders the
    conversation and only the reply's tokens (and the end-of-turn marker) carry loss. Returns (datum, prompt)."""
    from tinker import types

    msgs = [{"role": "user", "content": user}]
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": assistant}], tokenize=False)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    reply = tokenizer.encode(full[len(prompt_text):], add_special_tokens=False)
    ids = prompt + reply
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights})
    return datum, prompt


class Timer:
    """Named phases, each measured with time.perf_counter."""

    def __init__(self) -> None:
        self.phases: dict[str, list[float]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases.setdefault(name, []).append(time.perf_counter() - t0)

    def total(self, name: str) -> float:
        return sum(self.phases.get(name, []))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
