"""demo.py's handlers, in-process: the film is Diffusion.sample step by step, every knob arrives,
bad requests are one message and the server goes on; and the page itself over real HTTP, with
nothing on it that would leave 127.0.0.1. (tests/test_browser.py clicks through it in Chromium.)"""
import argparse
import json
import os
import re
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import one_line_error, run_cli

import demo as D
from config import SampleConfig
from harness.adapters import save_adapter
from harness.files import load_model
from lora import inject_lora

DRAWN = [0] * 784
for _r in range(6, 22):
    DRAWN[_r * 28 + 13] = DRAWN[_r * 28 + 14] = 255        # a vertical stroke: a 1


@pytest.fixture(scope="module")
def adapter(wild_adapter):
    return wild_adapter


@pytest.fixture(scope="module")
def demo(tiny_ckpt, adapter):
    return D.load_demo(argparse.Namespace(checkpoint=tiny_ckpt, lora=[adapter]), torch.device("cpu"))


def ask(demo, path, **req):
    status, result = D.handle(demo, path, json.dumps(req).encode())
    return status, (list(result) if not isinstance(result, dict) else result)


def test_the_film_is_diffusion_sample_step_by_step(demo):
    """The last x_t of the film equals Diffusion.sample from the same seed, bit for bit, for both
    samplers and for inpainting (the kept pixels put back at every step)."""
    model, d = demo.models["none"], demo.diffusion
    y = torch.tensor([3, 5])
    init = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = torch.zeros(2, 1, 28, 28)
    keep[..., :14] = 1
    for scfg, edit in [(SampleConfig(sampler="dpmpp", steps=4, seed=3), {}), (SampleConfig(steps=5, guidance=3.0), {}),
                       (SampleConfig(steps=4), {"init": init, "mask": keep}),
                       (SampleConfig(steps=6, strength=0.5), {"init": init})]:
        *_, (i, of, _, x, _) = D.film(demo, model, y, scfg, **edit)
        expected = d.sample(model, y, scfg, generator=torch.Generator().manual_seed(scfg.seed), **edit)
        assert (i + 1, of) == (len(d.timesteps(scfg)),) * 2 and torch.equal(x, expected), scfg


def test_generate_streams_every_step_then_the_grid(demo):
    status, events = ask(demo, "/api/generate", label=4, steps=6, n=3, sampler="ddim", seed=2)
    assert status == 200 and [e.get("step") for e in events[:-1]] == [1, 2, 3, 4, 5, 6]
    assert all(e["of"] == 6 and e["x_t"].startswith("data:image/png;base64,") for e in events[:-1])
    assert set(events[-1]) == {"grid", "seconds"} and events[-1]["grid"] == events[-2]["x_t"]


def test_every_knob_changes_the_drawing_and_the_seed_repeats_it(demo):
    base = dict(label=4, steps=4, n=2, seed=1, guidance=2.0, sampler="dpmpp", adapter="wild", scale=1.0)
    def grid(**change):
        req = {**base, **change}
        if req["adapter"] == "none":
            del req["scale"]                                # a knob of the adapter only
        return ask(demo, "/api/generate", **req)[1][-1]["grid"]
    first = grid()
    assert grid() == first
    for knob, value in [("label", 5), ("steps", 3), ("n", 3), ("seed", 2), ("guidance", 4.0), ("sampler", "ddim"),
                        ("adapter", "none"), ("scale", 0.0)]:
        assert grid(**{knob: value}) != first, knob
    assert grid(scale=0.0) == grid(adapter="none")          # strength 0 is the base model


@pytest.mark.parametrize("req,message", [
    ({"label": 10}, "label 10: must be between 0 and 9"), ({"label": "7"}, "label: expected a whole number"),
    ({"n": 17}, "n 17: must be between 1 and 16"), ({"steps": 0}, "steps 0"), ({"steps": 2.5}, "steps: expected"),
    ({"guidance": 1e9}, "guidance"), ({"guidance": None}, "guidance: expected a finite number"),
    ({"sampler": "ddpm"}, "choose dpmpp or ddim"), ({"adapter": "nope"}, "adapter \"nope\""),
    ({"adapter": "wild", "scale": 2}, "scale 2"), ({"seed": -1}, "seed -1"), ({"label": True}, "label: expected"),
    ({"seed": 1e400}, "seed: expected a whole number, got Infinity"), ({"guidance": float("nan")}, "guidance: expected"),
    ({"adapter": ["wild"]}, "adapter [\"wild\"]"), ({"steps": 2 ** 70}, "steps (a 22-digit number): must be between"),
])
def test_bad_knobs_are_one_message(demo, req, message):
    status, result = ask(demo, "/api/generate", **req)
    assert status == 400 and message in result["error"], result
    assert ask(demo, "/api/generate", steps=1, n=1)[0] == 200             # and the next request is served


def test_edit_redraws_or_finishes_the_drawing(demo):
    status, a = ask(demo, "/api/edit", pixels=DRAWN, mode="img2img", strength=0.5, label=7, steps=4, n=2)
    assert status == 200 and set(a) == {"input", "grid"}
    _, b = ask(demo, "/api/edit", pixels=DRAWN, mode="img2img", strength=0.9, label=7, steps=4, n=2)
    _, c = ask(demo, "/api/edit", pixels=DRAWN, mode="inpaint", keep="strokes", label=7, steps=4, n=2)
    _, e = ask(demo, "/api/edit", pixels=DRAWN, mode="inpaint", keep="left", label=7, steps=4, n=2)
    assert len({a["grid"], b["grid"], c["grid"], e["grid"]}) == 4 and c["input"] != e["input"]


@pytest.mark.parametrize("req,message", [
    ({"pixels": [0] * 784}, "the canvas is empty"), ({"pixels": [255] * 10}, "784 grey levels"),
    ({"pixels": [300] * 784}, "784 grey levels"), ({"pixels": "abc"}, "784 grey levels"),
    ({"pixels": DRAWN, "mode": "x"}, "choose img2img or inpaint"),
    ({"pixels": DRAWN, "mode": "inpaint", "keep": "all"}, "choose left, top or strokes"),
    ({"pixels": DRAWN, "mode": "img2img", "strength": 1.0}, "nothing of the drawing would be left"),
    ({"pixels": DRAWN, "mode": "img2img", "strength": 0.0}, "strength 0"),
])
def test_bad_edits_are_one_message(demo, req, message):
    status, result = ask(demo, "/api/edit", **req)
    assert status == 400 and message in result["error"], result


def test_attention_at_each_level_and_step(demo):
    assert demo.sizes == [28, 14]                                      # the tiny model's two levels
    status, a = ask(demo, "/api/attention", label=3, steps=5, step=5, size=28)
    assert status == 200 and a["names"] == ["token 0", "token 1", "where the label acts"] and len(a["maps"]) == 3
    _, b = ask(demo, "/api/attention", label=3, steps=5, step=1, size=28)
    _, c = ask(demo, "/api/attention", label=3, steps=5, step=5, size=14)
    assert a["t"] == 0 and b["t"] == 49 and a["maps"] != b["maps"] and a["maps"] != c["maps"]
    assert ask(demo, "/api/attention", steps=5, step=6)[1]["error"] == "step 6: must be between 1 and 5"
    assert "choose one of 28, 14" in ask(demo, "/api/attention", size=7)[1]["error"]


def test_requests_that_are_not_requests(demo):
    assert D.handle(demo, "/api/nope", b"{}")[0] == 404
    assert D.handle(demo, "/api/generate", b"{not json")[1] == {"error": "the request is not JSON"}
    assert D.handle(demo, "/api/generate", b"[1, 2]")[1] == {"error": "the request must be a JSON object"}


@pytest.fixture(scope="module")
def server(demo):
    httpd = D.ThreadingHTTPServer(("127.0.0.1", 0), D.make_handler(demo))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_the_page_is_served_and_names_nothing_outside_this_machine(server):
    for path in ("/", "/demo.js", "/demo.css"):
        status, kind, data = fetch(server + path)
        assert status == 200 and kind.startswith(("text/html", "text/javascript", "text/css")), path
        text = data.decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", text.replace("http://127.0.0.1", "")), path
        assert "@import" not in text and "<iframe" not in text
    info = json.loads(fetch(server + "/api/info")[2])
    assert info["adapters"] == ["none", "wild"] and info["sizes"] == [28, 14] and info["limits"]["n"] == 16


def test_the_server_streams_the_film_and_survives_bad_requests(server):
    status, kind, data = fetch(server + "/api/generate", {"steps": 3, "n": 1})
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert status == 200 and kind == "application/x-ndjson" and [e.get("step") for e in lines] == [1, 2, 3, None]
    assert fetch(server + "/api/generate", {"label": 99})[0] == 400
    req = urllib.request.Request(server + "/api/edit", data=b"x" * 70_000)
    with pytest.raises(urllib.error.HTTPError, match="413"):
        urllib.request.urlopen(req, timeout=60)
    assert fetch(server + "/nope")[0] == 404
    assert fetch(server + "/api/generate", {"steps": 2, "n": 1})[0] == 200


def test_demo_refuses_bad_flags_in_one_line(tiny_ckpt):
    one_line_error(run_cli("demo.py", "--checkpoint", tiny_ckpt, "--port", "70000"), "--port 70000")
    one_line_error(run_cli("demo.py", "--checkpoint", "nope.pt"), "nope.pt")
    busy = D.ThreadingHTTPServer(("127.0.0.1", 0), D.make_handler(None))
    try:
        one_line_error(run_cli("demo.py", "--checkpoint", tiny_ckpt, "--port", str(busy.server_address[1])),
                       "cannot serve on", "try another --port")
    finally:
        busy.server_close()


def test_an_adapter_for_another_model_is_refused_only_when_asked_for(tiny_ckpt, tmp_path):
    """Given with --lora, an adapter that does not fit is an error; one found in runs/ is a note."""
    other = tmp_path / "other.safetensors"
    model, _, ckpt = load_model(tiny_ckpt)
    fingerprint = "0" * 16
    inject_lora(model, ["to_v"], 2, 2.0)
    save_adapter(str(other), model, ["to_v"], 2, 2.0, False, ckpt["config"]["model"], fingerprint)
    with pytest.raises(D.LoraError, match="other base weights"):
        D.load_demo(argparse.Namespace(checkpoint=tiny_ckpt, lora=[str(other)]), torch.device("cpu"))
    assert os.path.isfile(tiny_ckpt)


# ----- the eighth probe -----

def test_a_deeply_nested_body_is_not_json(demo):
    assert D.handle(demo, "/api/generate", b"[" * 30000 + b"]" * 30000)[1] == {"error": "the request is not JSON"}


def test_a_page_that_stops_reading_does_not_hold_the_model(server):
    """A film nobody reads is still computed to its end, and the model is free for the next page
    at once (before, the lock waited on the stalled socket)."""
    import socket
    body = json.dumps({"n": 16, "steps": 50, "sampler": "ddim"}).encode()
    stalled = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        status, _, data = fetch(server + "/api/attention", {"steps": 2, "step": 1})   # urlopen gives up after 60 s
        assert status == 200 and json.loads(data)["names"][-1] == "where the label acts"
    finally:
        stalled.close()


def test_http_details(server):
    import http.client
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/api/generate")             # the headers of a chunked body: refused before any
    conn.putheader("Transfer-Encoding", "chunked")        # chunk is sent (sending them into a closed socket
    conn.endheaders()                                     # would race the reply)
    reply = conn.getresponse()
    assert reply.status == 411 and "Content-Length" in json.loads(reply.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/api/generate")
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 400 and json.loads(reply.read())["error"] == "Content-Length is not a number"
    conn.close()
    assert fetch(server + "/?v=2")[0] == 200 and fetch(server + "/demo.js?v=2")[0] == 200
    assert "seed 2147483648: must be between 0 and 2147483647" in fetch(server + "/api/generate", {"seed": 2 ** 31})[2].decode()


def test_adapters_get_names_of_their_own(tmp_path, adapter):
    """Two runs' adapter.safetensors are named by their folders; a file called none.safetensors does
    not become "none"; a clash that remains is refused."""
    import shutil
    paths = []
    for folder, name in (("lora-a", "adapter"), ("lora-b", "adapter"), ("x", "none"), ("y", "none")):
        os.makedirs(tmp_path / folder, exist_ok=True)
        paths.append(str(tmp_path / folder / f"{name}.safetensors"))
        shutil.copy(adapter, paths[-1])
    assert list(D.adapter_files("other.pt", paths[:3])) == ["lora-a", "lora-b", "x/none"]
    os.makedirs(tmp_path / "deeper" / "x")
    shutil.copy(adapter, tmp_path / "deeper" / "x" / "none.safetensors")
    with pytest.raises(D.DemoError, match="already called 'x/none'"):
        D.adapter_files("other.pt", [paths[2], str(tmp_path / "deeper" / "x" / "none.safetensors")])


def test_ctrl_c_while_a_film_is_computing_is_one_line(tiny_ckpt):
    """The server leaves at once with exit 130 and one line, whatever a request thread is doing."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    server = subprocess.Popen([sys.executable, "demo.py", "--checkpoint", tiny_ckpt, "--port", "0", "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = re.search(r"http://127\.0\.0\.1:\d+/", server.stdout.readline()).group(0)
    threading.Thread(target=fetch, args=(url + "api/generate", {"n": 16, "steps": 50, "sampler": "ddim"}),
                     daemon=True).start()
    time.sleep(1.0)
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 130
    assert server.stderr.read() == "demo.py: interrupted\n"


def test_bad_hosts_are_one_line(tiny_ckpt):
    one_line_error(run_cli("demo.py", "--checkpoint", tiny_ckpt, "--host", ""), "--host: give an address")
    one_line_error(run_cli("demo.py", "--checkpoint", tiny_ckpt, "--host", "no such host.invalid"), "--host")


# ----- the ninth probe -----

@pytest.mark.parametrize("req,message", [
    ({"label": 10 ** 330}, "label (a 331-digit number): must be between 0 and 9"), ({"labl": 3}, "labl: not a knob"),
    ({"adapter": "wild", "scale": 99}, "scale 99: must be between 0 and 1.5"),
    ({"adapter": "none", "scale": 0.5}, "scale: not a knob of /api/generate with no adapter"),
    ({"scale": 1.0}, "scale: not a knob of /api/generate with no adapter"),
])
def test_huge_unknown_and_unused_knobs_are_one_message(demo, req, message):
    status, result = ask(demo, "/api/generate", **req)
    assert status == 400 and message in result["error"], result


def test_info_answers_while_a_film_computes(demo):
    """/api/info needs no model, so it never waits for the lock."""
    with demo.lock:
        status, result = D.handle(demo, "/api/info", b"{}")
    assert status == 200 and result["adapters"] == ["none", "wild"]


def test_faint_strokes_that_keep_nothing_are_refused(demo):
    """The canvas counts as empty below grey 32; at 32 a stroke is ink, and a canvas of it is all kept."""
    status, result = ask(demo, "/api/edit", pixels=[32] * 784, mode="inpaint", keep="strokes", steps=2, n=1)
    assert status == 400 and "cover the whole image" in result["error"]


def test_the_same_adapter_twice_is_named_as_such(adapter):
    with pytest.raises(D.DemoError, match="already offered"):
        D.adapter_files("other.pt", [adapter, os.path.join(os.path.dirname(adapter), ".", os.path.basename(adapter))])


@pytest.mark.parametrize("path,req,message", [
    ("/api/edit", {"pixels": DRAWN, "mode": "img2img", "strength": 0.5, "keep": "left"},
     "keep: not a knob of /api/edit in mode img2img"),
    ("/api/edit", {"pixels": DRAWN, "mode": "inpaint", "keep": "left", "strength": 0.5},
     "strength: not a knob of /api/edit in mode inpaint"),
    ("/api/attention", {"n": 4}, "n: not a knob of /api/attention"),
    ("/api/edit", {"pixels": DRAWN, "mode": []}, "mode []: choose img2img or inpaint"),        # before: a traceback
    ("/api/edit", {"pixels": DRAWN, "mode": {"a": 1}, "keep": "left"}, 'mode {"a": 1}: choose img2img or inpaint'),
])
def test_a_knob_the_request_would_ignore_is_refused(demo, path, req, message):
    """Each request reads every knob it is sent, so no setting is silently dropped."""
    status, result = ask(demo, path, steps=2, **req)
    assert status == 400 and message in result["error"], result
