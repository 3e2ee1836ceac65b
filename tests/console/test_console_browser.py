"""The console in a real headless Chromium against the real server: sign in, watch a run's loss curve appear and
fall while the SDK trains, download/publish/expire/delete checkpoints, stream a playground reply, watch the live
page move under load, and see nothing of it as another tenant. No test may leave a browser console error."""

from __future__ import annotations

import io
import threading
import zipfile
from typing import Any

import pytest

from tests.console.conftest import Tab
from tests.e2e.conftest import KEY_ALICE, KEY_BOB, ServerProcess, service_client


def _datum(tok: Any, question: str, answer: str) -> Any:
    from tinker import types

    prompt, ans = tok.encode(question), tok.encode(answer)
    ids = prompt + ans
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:],
                                       "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(ans)})


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def _no_errors(tab: Tab, allowed: tuple[str, ...] = ()) -> None:
    bad = [e for e in tab.errors if not any(a in e for a in allowed)]
    assert not bad, f"browser console errors: {bad}"


def test_sign_in_and_loss_curve_falls(console_server: ServerProcess, tab_factory, state) -> None:
    from tinker import types

    tab = tab_factory()
    page = tab.goto("/console/runs")
    page.wait_for_selector("#signin:not([hidden])")
    tab.shot("signin")
    tab.sign_in(KEY_ALICE)
    assert page.evaluate("sessionStorage.getItem('tinkerbell.apiKey')") == KEY_ALICE
    assert tab.context.cookies() == []  # the key lives in the tab's session storage only

    sc = service_client(console_server, KEY_ALICE)
    tc = sc.create_lora_training_client(base_model=str(console_server.model), rank=8, seed=0).result()
    state.update(sc=sc, tc=tc, run=tc.model_id)
    page.wait_for_selector(f"a:text('{tc.model_id}')")  # the list polls: the new run shows up without a reload
    page.click(f"a:text('{tc.model_id}')")
    page.wait_for_selector("text=No metrics yet")

    datum = _datum(tc.get_tokenizer(), "User: What is your name?\nAssistant:", " My name is Tinkerbell.")
    first = last = None
    for step in range(40):
        fb = tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        last = fb.result().metrics["loss:sum"]
        first = first if first is not None else last
        if step >= 5 and last < 0.05 * first:  # the chart check below wants at least 5 points
            break
    chart = "figure[data-metric='loss:sum']"
    page.wait_for_function(f"() => {{ const f = document.querySelector(\"{chart}\"); "
                           f"return f && Number(f.dataset.last) < 0.5 * Number(f.dataset.first) && "
                           f"Number(f.dataset.count) >= 5; }}")
    points = page.eval_on_selector(chart, "f => [Number(f.dataset.first), Number(f.dataset.last), Number(f.dataset.count)]")
    assert points[0] == pytest.approx(first, rel=1e-5) and points[1] < points[0] * 0.5
    assert page.is_visible("figure[data-metric='learning rate']")
    assert page.locator(f"{chart} svg path.line").count() == 1
    tab.shot("run")
    page.goto(console_server.url + "/console/runs")
    page.wait_for_selector(f"a:text('{tc.model_id}')")
    tab.shot("runs")
    _no_errors(tab)


def test_checkpoints_download_publish_ttl_delete(console_server, tab_factory, state) -> None:
    tc = state["tc"]
    state["weights"] = tc.save_state("console-state").result().path
    state["sampler"] = tc.save_weights_for_sampler("console-sampler").result().path
    extra = tc.save_weights_for_sampler("to-delete").result().path
    tab = tab_factory()
    tab.sign_in(KEY_ALICE)
    page = tab.goto("/console/checkpoints")
    row = page.locator("tr", has_text=state["sampler"])
    row.wait_for()

    with page.expect_download() as dl:
        row.locator("[data-action=download]").click()
    with zipfile.ZipFile(io.BytesIO(open(dl.value.path(), "rb").read())) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names

    row.locator("button:text('Publish')").click()
    page.click("dialog [data-confirm=ok]")
    page.locator("tr", has_text=state["sampler"]).locator("button:text('Unpublish')").wait_for()

    row = page.locator("tr", has_text=state["weights"])
    row.locator("input.ttl").fill("48")
    row.locator("button:text('Set TTL')").click()
    page.click("dialog [data-confirm=ok]")
    page.locator("tr", has_text=state["weights"]).locator("text=in 2.0 d").wait_for()

    row = page.locator("tr", has_text=extra)
    row.locator("[data-action=delete]").click()
    page.keyboard.press("Escape")  # cancelling leaves it alone
    assert page.locator("tr", has_text=extra).count() == 1
    row.locator("[data-action=delete]").click()
    page.click("dialog [data-confirm=ok]")
    page.locator("tr", has_text=extra).wait_for(state="detached")
    tab.shot("checkpoints")
    _no_errors(tab)


def test_playground_streams_a_reply(console_server, tab_factory, state) -> None:
    tab = tab_factory()
    tab.sign_in(KEY_ALICE)
    page = tab.goto("/console/playground")
    page.wait_for_selector(f"#pg-model option[value='{state['sampler']}']", state="attached")
    page.select_option("#pg-model", state["sampler"])
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-prompt", "What is your name?")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as resp:
        page.click("#pg-send")
    assert resp.value.status == 200 and resp.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    reply = page.locator(".msg.assistant .text").inner_text()
    chunks = int(page.locator(".msg.assistant").get_attribute("data-chunks") or 0)
    assert reply.strip() and chunks >= 2, (reply, chunks)
    assert "tokens" in page.locator("#pg-status").inner_text()
    tab.shot("playground")
    _no_errors(tab)


def test_live_page_moves_under_load(console_server, tab_factory, state) -> None:
    from tinker import types

    tab = tab_factory()
    tab.sign_in(KEY_ALICE)
    page = tab.goto("/console/live")
    page.wait_for_selector("#live-tokens-sampled")
    before = int(page.inner_text("#live-tokens-sampled").replace(",", ""))
    sampler = state["sc"].create_sampling_client(model_path=state["sampler"])
    tok = state["tc"].get_tokenizer()
    stop = threading.Event()

    def load() -> None:
        prompt = types.ModelInput.from_ints(tok.encode("User: tell me a long story\nAssistant:"))
        params = types.SamplingParams(max_tokens=96, temperature=1.0)
        while not stop.is_set():
            futs = [sampler.sample(prompt, num_samples=4, sampling_params=params) for _ in range(4)]
            for f in futs:
                f.result()

    workers = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        page.wait_for_function("() => Number(document.querySelector('#live-sample-rate').textContent.replace(/,/g, '')) > 0")
        page.wait_for_function(f"() => Number(document.querySelector('#live-tokens-sampled').textContent"
                               f".replace(/,/g, '')) > {before}")
        resident = page.locator(".slots li.yours").all_inner_texts()
        assert state["sampler"] in resident  # the tenant's own adapter is named in the LoRA slots
        tab.shot("live")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    _no_errors(tab)


def test_another_tenant_sees_none_of_it(console_server, tab_factory, state) -> None:
    tab = tab_factory()
    tab.sign_in(KEY_BOB)
    page = tab.page
    page.wait_for_selector("text=No training runs yet")
    assert state["run"] not in page.content()
    page = tab.goto("/console/checkpoints")
    page.wait_for_selector("text=No checkpoints saved yet")
    page = tab.goto("/console/runs/" + state["run"])
    page.wait_for_selector(".error:text('404')")
    assert page.locator("figure").count() == 0
    page = tab.goto("/console/playground")
    page.wait_for_selector("#pg-model")
    assert page.locator("#pg-model option").count() == 1  # the base model only
    page = tab.goto("/console/live")
    page.wait_for_selector("#live-tokens-sampled")
    assert state["run"] not in page.content() and state["sampler"] not in page.content()
    # The only console messages are the browser's own note of the expected 404 for Alice's run.
    _no_errors(tab, allowed=("status of 404",))


def test_benchmarks_and_phone_width_and_keyboard(console_server, tab_factory) -> None:
    tab = tab_factory(width=390, height=844)
    tab.sign_in(KEY_ALICE)
    page = tab.goto("/console/bench")
    page.wait_for_selector("td:text('3,120')")
    page.wait_for_selector("td:text('9100')")
    page.wait_for_selector(".md h2:text('Benchmark report')")
    page.wait_for_selector(".md td:text('777')")
    page.wait_for_function("() => { const i = document.querySelector('.md img.plotimg'); "
                           "return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth === 1; }")
    tab.shot("bench")
    for path in ("/console/runs", "/console/checkpoints", "/console/playground", "/console/live", "/console/bench"):
        page = tab.goto(path)
        page.wait_for_selector("#main h1")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{path} scrolls sideways at phone width by {overflow}px"
    page = tab.goto("/console/runs")
    page.wait_for_selector("#main h1")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    focused = []
    for _ in range(7):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert {"Runs", "Checkpoints", "Playground", "Live", "Benchmarks"} <= set(focused)
    _no_errors(tab)


def test_no_auth_needs_no_sign_in(tiny_llama_dir, tmp_path, browser) -> None:
    srv = ServerProcess(tiny_llama_dir, tmp_path / "data", tmp_path / "server.log", ["--no-auth"]).start()
    try:
        tab = Tab(browser, srv.url)
        page = tab.goto("/console/bench")
        page.wait_for_selector("#bench-empty")
        assert page.is_hidden("#signin")
        assert "no sign-in" in page.inner_text("#who")
        page = tab.goto("/console/runs")
        page.wait_for_selector("text=No training runs yet")
        _no_errors(tab)
        tab.close()
    finally:
        srv.stop()
