"""``moekit serve``: the OpenAI-compatible completions server, driven by the official ``openai`` client.

The server runs in a thread (uvicorn on 127.0.0.1, a free port); one test starts the real CLI process.
Greedy completions through the server must equal :func:`moekit.serving.generate` on the same prompt.
"""

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from moekit.data import get_tokenizer
from moekit.serving import generate
from moekit.serving.server import build_app
from moekit.training import load_run

from .serving_util import make_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server at {url} did not come up")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("serve") / "run")
    cfg, model, _ = load_run(run, "cpu")
    tok = get_tokenizer(cfg.data.tokenizer)
    app = build_app(model, tok.encode, tok.decode, max_batch=4)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield url, client, model, tok, app, run
    server.should_exit = True
    thread.join(timeout=10)


def expected(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    return tok.decode(generate(model, torch.tensor([ids]), n)[0, len(ids):].tolist())


def test_completion_equals_generate_and_reports_usage(served):
    url, client, model, tok, _, _ = served
    r = client.completions.create(model="m", prompt="def f(x):", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected(model, tok, "def f(x):", 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("def f(x):")) and r.usage.completion_tokens == 12
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_streaming_gives_the_same_text_in_pieces(served):
    _, client, model, tok, _, _ = served
    pieces, reasons = [], []
    for chunk in client.completions.create(model="m", prompt="import ", max_tokens=10, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected(model, tok, "import ", 10)
    assert reasons[-1] == "length" and len(pieces) > 2


def test_stop_strings_cut_the_text(served):
    _, client, model, tok, _, _ = served
    full = expected(model, tok, "class A:", 20)
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    r = client.completions.create(model="m", prompt="class A:", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="class A:", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    _, client, model, tok, app, _ = served
    prompts = ["a = ", "for i in", "x", "return self."]
    before = app.state.batcher.largest_batch

    def ask(p):
        return client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(ask, prompts * 2))
    assert texts == [expected(model, tok, p, 8) for p in prompts * 2]
    assert max(before, app.state.batcher.largest_batch) >= 2  # some requests shared a batch


def test_seeded_sampling_is_reproducible(served):
    _, client, _, _, _, _ = served
    a = client.completions.create(model="m", prompt="def ", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = client.completions.create(model="m", prompt="def ", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "stop": [""]}, "stop"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(served, body, param):
    url, client, _, _, _, _ = served
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", **{k: v for k, v in body.items() if k != "model"})
    assert client.completions.create(model="m", prompt="ok", max_tokens=2, temperature=0).choices[0].text


def test_malformed_json_and_unknown_routes(served):
    url, _, _, _, _, _ = served
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


@pytest.mark.slow
def test_the_cli_serves_an_offloaded_model(served):
    _, _, model, tok, _, run = served
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(run), "--port", str(port),
                             "--expert-memory", "25%", "--prefetch", "router"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"prompt": "def f(x):", "max_tokens": 12, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == expected(model, tok, "def f(x):", 12)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_cli_refuses_a_budget_below_one_expert(served, capsys):
    from moekit.cli.main import main
    assert main(["serve", str(served[5]), "--expert-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert "smaller than one expert" in err and err.count("\n") == 1
