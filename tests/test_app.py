"""The app as users meet it: a real Gradio server on 127.0.0.1 with the embedded model, driven by
``gradio_client`` (the ``align`` API) and by headless Chromium through Playwright (the Align tab).

One server serves the whole module (its models load once, in the background, as in production);
generation is kept to 24 new tokens so the module costs a few minutes of CPU.
"""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from api_server import FakeProvider
from conftest import require_chromium
from metaaligner_core.errors import MetaAlignerError
from webapp.config import AppConfig
from webapp.launch import launch
from webapp.service import GenerationSettings, collect_objectives

pytestmark = pytest.mark.slow

MAX_NEW = 24
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir):
    """``python app.py``'s launch path, in-process on a free port; closed at teardown."""
    db = tmp_path_factory.mktemp("app") / "annotations.db"
    # one generation slot: the slot tests below wait for it (test_app_scheduling.py runs the
    # default of several sessions sharing one batch)
    config = AppConfig(port=free_port(), db_url=f"sqlite:///{db}", max_new_tokens=MAX_NEW, concurrency=1)
    demo = launch(config, block=False, quiet=True)
    url = f"http://127.0.0.1:{config.port}/"
    try:
        yield demo, url
    finally:
        demo.close()
    with pytest.raises(OSError):  # the server really stopped
        urllib.request.urlopen(url, timeout=5)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def wait_for_models(demo, timeout=300):
    """The background preload finishes (it starts right after launch)."""
    registry = demo.service.registry
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registry.loaded("aligner", "default") is not None and registry.loaded("policy", "default") is not None:
            return registry.loaded("policy", "default"), registry.loaded("aligner", "default")
        time.sleep(0.2)
    raise AssertionError(f"models not loaded after {timeout} s: {registry.status_markdown()}")


def slot_free(service) -> bool:
    if service._slots.acquire(blocking=False):
        service._slots.release()
        return True
    return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_page_and_api_shape(server, client):
    demo, url = server
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    align = info["/align"]
    assert [p["parameter_name"] for p in align["parameters"]] == ["query", "objectives", "draft"]
    assert len(align["returns"]) == 2
    # The page shows the model status, and models were loading or loaded without any request.
    assert demo.service.registry.statuses(), "preload did not start at launch"
    # Bounded: a queue of 32 waiting requests, uploads up to 1 MB, served files in a private folder.
    assert demo._queue.max_size == 32
    assert demo.max_file_size == 1024 * 1024


def test_align_with_a_pasted_draft(server, client):
    policy, aligner = wait_for_models(server[0])
    query, draft = "What is the boiling point of water at sea level?", "Water boils at 50 degrees Celsius."
    out_draft, aligned = client.predict(query, "honesty,helpfulness", draft, api_name="/align")
    assert out_draft == draft
    assert aligned and aligned == aligner.align(query, draft, "honesty,helpfulness", max_new_tokens=MAX_NEW)


def test_align_without_a_draft_asks_the_policy(server, client):
    policy, aligner = wait_for_models(server[0])
    query = "Name one planet of the solar system."
    out_draft, aligned = client.predict(query, "helpfulness", "", api_name="/align")
    assert out_draft and out_draft == policy.complete(query, max_tokens=MAX_NEW).text
    assert aligned == aligner.align(query, out_draft, "helpfulness", max_new_tokens=MAX_NEW)


def test_align_with_an_unseen_objective(server, client):
    _, aligner = wait_for_models(server[0])
    query, draft = "Say hello to a new colleague.", "Hello."
    spec = "Politeness: the response should be warm and courteous, honesty"
    out_draft, aligned = client.predict(query, spec, draft, api_name="/align")
    assert out_draft == draft
    assert aligned == aligner.align(query, draft, spec, max_new_tokens=MAX_NEW)
    assert "Politeness: the response should be warm and courteous; Honesty:" in aligner.prompt(query, draft, spec)


def test_unknown_objective_key_is_a_clear_error(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r'unknown objective "wisdom" \(valid keys: .*honesty'):
        client.predict("Why is the sky blue?", "honesty,wisdom", "Because.", api_name="/align")
    with pytest.raises(AppError, match="query: empty"):
        client.predict("   ", "honesty", "Because.", api_name="/align")


def test_concurrent_sessions_all_get_answers(server):
    """Four clients at once: the shared model serves them one at a time, each gets its own answer."""
    from gradio_client import Client

    _, aligner = wait_for_models(server[0])
    jobs = [("Is the earth flat?", "Yes, it is flat."), ("What is 2 + 2?", "2 + 2 is 5."),
            ("Is the earth flat?", "Yes, it is flat."), ("Name a colour.", "Blue.")]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def ask(i, query, draft):
        try:
            results[i] = tuple(Client(server[1], verbose=False).predict(query, "honesty", draft, api_name="/align"))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, q, d)) for i, (q, d) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, (q, d) in enumerate(jobs):
        assert results[i] == (d, aligner.align(q, d, "honesty", max_new_tokens=MAX_NEW))


def test_a_second_generation_waits_and_stop_frees_the_slot(server):
    """The generation slot is held while a stream runs; closing the stream (what Stop does)
    stops the model and frees the slot for the next request."""
    demo, _ = server
    wait_for_models(demo)
    service = demo.service
    objs = collect_objectives(["ultrafeedback/honesty"], "", "ultrafeedback")
    long = GenerationSettings(max_new_tokens=400)
    first = service.stream("Tell me about the moon.", objs, "The moon is made of cheese.", settings=long)
    upd = next(first)
    while not upd.aligned:
        upd = next(first)
    second = service.stream("Tell me about the sun.", objs, "The sun is cold.", settings=long)
    assert next(second).phase == "waiting"
    started = time.monotonic()
    first.close()
    upd = next(second)  # gets the slot now
    assert upd.phase in ("loading-aligner", "aligning")
    assert time.monotonic() - started < 5, "closing the first stream did not free the slot promptly"
    second.close()
    assert slot_free(service)


def test_api_policy_through_an_openai_compatible_server(server):
    """A policy served over HTTP in the OpenAI wire format: its streamed draft goes to the aligner."""
    demo, _ = server
    _, aligner = wait_for_models(demo)
    objs = collect_objectives(["ultrafeedback/helpfulness"], "", "ultrafeedback")
    with FakeProvider(reply=lambda body: "Paris is the capital of France.") as fake:
        spec = f"openai-compatible:fake-model@{fake.base_url}/v1"
        with pytest.raises(MetaAlignerError, match="not offered by this server"):
            list(demo.service.stream("Capital of France?", objs, "", policy=spec))
        demo.allow_list.add("policy", spec)  # what --allow-models does at start-up
        drafts = [u.draft for u in demo.service.stream("Capital of France?", objs, "", policy=spec)]
        assert fake.calls and fake.calls[0].body.get("stream") is True
    assert drafts[-1] == "Paris is the capital of France."
    assert "Paris is" in drafts and "Paris is the" in drafts  # the draft arrived word by word
    assert demo.service.registry.loaded("policy", spec) is not None


def test_api_policy_without_its_key_is_refused(server, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    objs = collect_objectives(["ultrafeedback/helpfulness"], "", "ultrafeedback")
    server[0].allow_list.add("policy", "anthropic:claude-3-5-haiku-latest")
    with pytest.raises(MetaAlignerError, match="ANTHROPIC_API_KEY is not set"):
        list(server[0].service.stream("Hi?", objs, "", policy="anthropic:claude-3-5-haiku-latest"))


def test_send_to_annotation_queues_the_pair(server):
    from sqlalchemy import select

    from annotation.models import Response
    from annotation.store import Store

    demo, _ = server
    service = demo.service
    with pytest.raises(MetaAlignerError, match="nothing to send"):
        service.send_to_annotation("q", "", "default", "", "default")
    uid = service.send_to_annotation("Why is the sky blue?", "Because of the sea.", "default",
                                     "Because air scatters blue light more than red.", "default")
    with pytest.raises(MetaAlignerError, match='protocol "nonesuch"'):
        service.send_to_annotation("q", "d", "default", "a", "default", protocol="nonesuch")
    store = Store(service.db_url)
    store.add_annotator("rater", "a-long-password")
    view = store.item_view(store.sign_in("rater", "a-long-password"), uid)
    assert view.query == "Why is the sky blue?" and view.protocol.name == "imhi"
    assert [r.text for r in view.responses] == ["Because of the sea.", "Because air scatters blue light more than red."]
    with store._session() as s:  # model names are kept for export, though annotators never see them
        sources = s.scalars(select(Response.source).order_by(Response.position)).all()
    assert sources == ["SmolLM2-135M-Instruct (embedded)", "SmolLM2-135M-Instruct (embedded)"]


@pytest.mark.browser
def test_align_tab_in_a_real_browser(server, artifacts_dir):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a loaded CI machine renders slowly
    demo, url = server
    wait_for_models(demo)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            expect(page.locator("#disclaimer")).to_contain_text("not clinical")
            expect(page.locator("#aligner-note")).to_contain_text("base model")
            page.get_by_label("Honesty: the response should not tell lies").check()
            page.get_by_label("Readability: the response should be easy to read and understand, "
                              "not too technical for laymen.").check()
            page.locator("#new-objectives textarea").fill("Politeness: the response should be courteous")
            page.locator("#query textarea").fill("What is the capital of France?")
            page.locator("#align-btn").click()
            expect(page.locator("#run-status")).to_contain_text("Done", timeout=300_000)
            draft = page.locator("#draft-out textarea").input_value()
            aligned = page.locator("#aligned-out textarea").input_value()
            page.screenshot(path=str(artifacts_dir / "app_align_tab.png"), full_page=True)
            assert draft.strip() and aligned.strip()
            # The prompt preview shows exactly what the aligner read, objectives in tick order.
            page.get_by_text("Aligner prompt (exactly what the aligner reads)").click()
            prompt = page.locator("#prompt-preview textarea").input_value()
            assert ("Honesty: the response should not tell lies; Readability: the response should be easy to read "
                    "and understand, not too technical for laymen.; Politeness: the response should be courteous"
                    ) in prompt
            assert f"| Answer: {draft} | Edit: " in prompt
            page.locator("#send-btn").click()  # not signed in: refused
            expect(page.locator(".toast-body").first).to_contain_text("not signed in")
            page.locator(".toast-body").first.wait_for(state="detached", timeout=30_000)
            # A bad objective line is a toast, not a stack trace.
            page.locator("#new-objectives textarea").fill("Politeness")
            page.locator("#align-btn").click()
            toast = page.locator(".toast-body").first
            expect(toast).to_contain_text('new objectives, line 1: unknown objective "Politeness"')
            expect(page.locator("body")).not_to_contain_text("Traceback")

            # Stop: a long correction stops streaming, and the next Align runs at once.
            page.locator("#new-objectives textarea").fill("")
            page.locator("#draft-in textarea").fill("The moon is made of cheese.")
            page.get_by_text("Generation settings").click()
            tokens = page.locator("#max-new-tokens input[type=number]")
            tokens.fill("400")
            tokens.press("Enter")
            page.locator("#align-btn").click()
            page.wait_for_function("document.querySelector('#aligned-out textarea').value.length > 0",
                                   timeout=120_000)
            page.locator("#stop-btn").click()
            expect(page.locator("#run-status")).to_contain_text("Stopped.", timeout=30_000)
            stopped_at = page.locator("#aligned-out textarea").input_value()
            time.sleep(3)
            assert page.locator("#aligned-out textarea").input_value() == stopped_at
            assert wait_until(lambda: slot_free(demo.service), 15), "the server kept generating after Stop"
            tokens.fill(str(MAX_NEW))
            tokens.press("Enter")
            page.locator("#align-btn").click()
            expect(page.locator("#run-status")).to_contain_text("Done", timeout=120_000)
            assert page.locator("#draft-out textarea").input_value() == "The moon is made of cheese."

            # The Annotate tab of the same app: an annotator signs in and gets a queued item.
            from annotation.store import Store

            Store(demo.service.db_url).add_annotator("browser-rater", "a-long-password")
            Store(demo.service.db_url).enqueue_item("Is water wet?", [("Yes.", None), ("It makes things wet.", None)])
            page.get_by_role("tab", name="Annotate").click()
            page.locator("#ma-name").locator("input, textarea").fill("browser-rater")
            page.locator("#ma-password").locator("input, textarea").fill("a-long-password")
            page.locator("#ma-signin").click()
            expect(page.locator("#ma-who")).to_contain_text("browser-rater")
            expect(page.locator("#ma-rubric")).to_be_visible()
            page.screenshot(path=str(artifacts_dir / "app_annotate_tab.png"), full_page=True)
            # Signed in, the same page's "Send to annotation" queues the last result under their name.
            page.get_by_role("tab", name="Align").click()
            page.locator("#send-btn").click()
            toast = page.locator(".toast-body").first
            expect(toast).to_contain_text("Sent to annotation under the imhi protocol")
            expect(toast).to_contain_text("queued for 2 raters")  # who will see it
        finally:
            browser.close()
