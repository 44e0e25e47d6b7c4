"""Play with the model: `python demo.py` serves one page on http://127.0.0.1:8000 where you turn
the article's knobs -- the label, guidance w, sampler and steps, the seed, a LoRA adapter and its
strength -- and watch the denoising happen; draw a digit and have it redrawn (img2img) or
finished (inpainting); see the cross-attention of any level at any step.

Everything runs here, on this machine: the page (demo/) has no outside links, and the server
answers only 127.0.0.1 unless --host says otherwise. It draws from your run (runs/mnist/ckpt.pt)
or, when there is none, from the weights this repo ships (weights/).
"""
import harness  # noqa: F401  isort:skip -- first: Ctrl-C while the rest imports is one line
import base64
import io
import ipaddress
import json
import math
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from config import SampleConfig
from diffusion import Diffusion, SamplingError
from harness.adapters import load_adapter
from harness.cli import Parser, UsageError, run_cli
from harness.dist import pick_device
from harness.files import DEFAULT_CHECKPOINT, SHIPPED, load_model, shipped, shipped_unless_trained
from lora import LoraError, set_fused, set_scale
from visualize import attention_at, by_level, steering

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")   # the page's own files
FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
         "/demo.css": ("demo.css", "text/css; charset=utf-8")}
LIMITS = {"n": 16, "steps": 100, "guidance": 20.0, "scale": 1.5, "body": 64_000}   # one request cannot exhaust the machine
SAMPLERS = ("dpmpp", "ddim")
ZOOM = 4                                       # screen pixels per digit pixel


class DemoError(UsageError):
    """A request the demo cannot serve; the message is shown on the page."""


@dataclass
class Demo:
    """The loaded model (with each adapter on a copy of it), its diffusion, and a lock: one
    request computes at a time."""
    models: dict
    diffusion: Diffusion
    source: str
    sizes: list
    lock: threading.Lock


# ----- the model and its adapters -----

def adapter_files(checkpoint, extra):
    """The adapters the page offers: the shipped bold and italic with the shipped model, your
    runs' (runs/lora-bold, runs/lora-italic) with yours, and every --lora given."""
    found = {}
    for style in ("bold", "italic"):
        path = (os.path.join(SHIPPED, style + ".safetensors") if shipped(checkpoint)
                else os.path.join("runs", f"lora-{style}", "adapter.safetensors"))
        if os.path.isfile(path):
            found[style] = path
    for path in extra:
        if any(os.path.realpath(path) == os.path.realpath(p) for p in found.values()):
            raise DemoError(f"--lora {path}: that adapter is already offered; give each file once")
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        name = folder if stem == "adapter" else stem               # runs/lora-x/adapter.safetensors -> lora-x
        if name in found or name == "none":
            name = f"{folder}/{stem}"
        if name in found or name == "none":
            raise DemoError(f"--lora {path}: another adapter is already called {name!r}; rename one of the files")
        found[name] = path
    return found


def load_demo(args, device):
    """Your run or the shipped weights, and one model copy per adapter. -> Demo"""
    checkpoint = shipped_unless_trained(args.checkpoint, DEFAULT_CHECKPOINT)
    model, diff_cfg, ckpt = load_model(checkpoint, device)
    models = {"none": model}
    for name, path in adapter_files(checkpoint, args.lora).items():
        copy, _, _ = load_model(checkpoint, device)
        try:
            load_adapter(copy, path, ckpt["config"]["model"])
        except LoraError as e:
            if path in args.lora:
                raise
            print(f"note: {name} adapter left out ({e})")
            continue
        set_fused(copy, True)
        models[name] = copy
    diffusion = Diffusion(diff_cfg, model.cfg.num_classes).to(device)
    _, blocks = attention_at(model, diffusion, torch.zeros(1, 1, 28, 28, device=device), 0, 0)
    return Demo(models, diffusion, os.path.relpath(checkpoint), list(by_level(blocks)), threading.Lock())


# ----- requests -----

def number(req, key, lo, hi, default, kind=float):
    """req[key] as a number in [lo, hi], or a DemoError naming the field."""
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or (kind is int and value != int(value)):
        raise DemoError(f"{key}: expected {'a whole' if kind is int else 'a finite'} number, got {json.dumps(value)[:40]}")
    if not (lo <= value <= hi):
        shown = (lambda v: f"{v:g}") if kind is float else \
            (lambda v: str(int(v)) if len(str(int(v))) <= 15 else f"(a {len(str(int(v)))}-digit number)")
        raise DemoError(f"{key} {shown(value)}: must be between {shown(lo)} and {shown(hi)}")
    return kind(value)


def sampling(demo, req):
    """The knobs every request shares -> (model, labels (n,), SampleConfig), each one checked."""
    sampler = req.get("sampler", "dpmpp")
    if sampler not in SAMPLERS:
        raise DemoError(f"sampler {json.dumps(sampler)[:40]}: choose {' or '.join(SAMPLERS)}")
    adapter = req.get("adapter", "none")
    if not isinstance(adapter, str) or adapter not in demo.models:
        raise DemoError(f"adapter {json.dumps(adapter)[:40]}: choose one of {', '.join(demo.models)}")
    label = number(req, "label", 0, demo.diffusion.null_label - 1, 7, int)
    n = number(req, "n", 1, LIMITS["n"], 8, int)
    steps = number(req, "steps", 1, min(LIMITS["steps"], demo.diffusion.T), 10, int)
    scfg = SampleConfig(sampler=sampler, steps=steps, guidance=number(req, "guidance", 0, LIMITS["guidance"], 2.0),
                        seed=number(req, "seed", 0, 2 ** 31 - 1, 0, int),
                        strength=number(req, "strength", 0.05, 1.0, 1.0))
    if demo.diffusion.cfg.p_uncond == 0 and scfg.guidance != 1:
        raise DemoError(f"guidance {scfg.guidance:g}: this model was trained with --p-uncond 0 (no unconditional "
                        "output to push away from); use guidance 1")
    model, scale = demo.models[adapter], number(req, "scale", 0, LIMITS["scale"], 1.0)
    if adapter != "none":
        set_scale(model, scale)
    return model, torch.full((n,), label, device=demo.diffusion.betas.device), scfg


def png(x, nrow=None):
    """Images (B, 1, 28, 28) in [-1, 1] -> a PNG data URL of a grid, ZOOM x larger, nearest pixels."""
    from PIL import Image
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()     # (B, 28, 28)
    nrow = nrow or min(len(a), 8)
    rows = math.ceil(len(a) / nrow)
    grid = np.zeros((rows * 30, nrow * 30), np.uint8)
    for i, img in enumerate(a):
        r, c = divmod(i, nrow)
        grid[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = img
    return data_url(Image.fromarray(grid).resize((grid.shape[1] * ZOOM, grid.shape[0] * ZOOM), Image.NEAREST))


def data_url(im):
    """A PIL image -> a PNG data URL the page can show as it is."""
    buf = io.BytesIO()
    im.save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def film(demo, model, y, scfg, init=None, mask=None):
    """Diffusion.sample's loop, one step at a time -> yields (i, of, x_t, x_t of the next step,
    the x_0 predicted at this one). The same numbers as Diffusion.sample from the same seed."""
    d, g = demo.diffusion, torch.Generator(y.device).manual_seed(scfg.seed)
    ts = d.timesteps(scfg)
    x = torch.randn((len(y), 1, 28, 28), generator=g, device=y.device)
    if init is not None and scfg.strength < 1:
        x = d.q_sample(init, torch.full((len(y),), ts[0], device=y.device), x)
    prev = None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x_next, x0 = d.denoise(model, x, t, t_next, y, scfg, g, prev)
        x_next, prev = d.keep(x_next, init, mask, t_next, g), (t, x0)
        if not torch.isfinite(x_next).all():
            raise SamplingError(f"x_t became non-finite at step {i + 1}: the weights or guidance are broken")
        yield i, len(ts), x, x_next, x0
        x = x_next


def generate(demo, req):
    """POST /api/generate: the film as it is drawn (x_t and x_0 per step), then the final grid."""
    model, y, scfg = sampling(demo, {**req, "strength": 1.0})
    start = time.perf_counter()
    with torch.inference_mode():
        for i, of, _, x, x0 in film(demo, model, y, scfg):
            yield {"step": i + 1, "of": of, "x_t": png(x), "x0": png(x0)}
    yield {"grid": png(x), "seconds": round(time.perf_counter() - start, 2)}


def drawing(req):
    """The page's canvas, 28 x 28 grey levels 0..255 (white ink on black) -> (image (1, 1, 28, 28)
    in [-1, 1], ink (1, 1, 28, 28) of 1 where something was drawn)."""
    pixels = req.get("pixels")
    if (not isinstance(pixels, list) or len(pixels) != 784
            or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 255 for p in pixels)):
        raise DemoError("pixels: expected the 784 grey levels (0..255) of a 28x28 drawing")
    a = torch.tensor(pixels, dtype=torch.float32).reshape(1, 1, 28, 28)
    if a.max() < 32:
        raise DemoError("the canvas is empty: draw a digit (or part of one) first")
    return a / 127.5 - 1, (a >= 32).float()


def keep_mask(ink, keep):
    """Which pixels inpainting keeps (1): the left or top half of the drawing, or its strokes."""
    mask = torch.zeros_like(ink)
    if keep == "left":
        mask[..., :14] = 1
    elif keep == "top":
        mask[..., :14, :] = 1
    elif keep == "strokes":
        mask = torch.nn.functional.max_pool2d(ink, 3, 1, 1)     # the strokes and the pixels next to them
    else:
        raise DemoError(f"keep {json.dumps(keep)[:40]}: choose left, top or strokes")
    return mask


def edit(demo, req):
    """POST /api/edit: img2img (the drawing noised to t = strength T, redrawn as the label) or
    inpainting (the kept part stays, the rest is drawn) -> the grid, with the input."""
    image, ink = drawing(req)
    mode = req.get("mode")
    if mode not in ("img2img", "inpaint"):
        raise DemoError(f"mode {json.dumps(mode)[:40]}: choose img2img or inpaint")
    model, y, scfg = sampling(demo, req if mode == "img2img" else {**req, "strength": 1.0})
    if mode == "img2img" and scfg.strength == 1.0:
        raise DemoError("strength 1 starts from pure noise: nothing of the drawing would be left; choose less")
    device = y.device
    image = image.to(device).expand(len(y), -1, -1, -1)
    mask = keep_mask(ink, req.get("keep", "left")).to(device).expand(len(y), -1, -1, -1) if mode == "inpaint" else None
    if mask is not None and mask.all():
        raise DemoError("your strokes cover the whole image: nothing would be left to draw; keep a half instead")
    with torch.inference_mode():
        *_, (_, _, _, x, _) = film(demo, model, y, scfg, init=image, mask=mask)
    shown_input = image[:1] if mask is None else image[:1] * mask[:1] + (mask[:1] - 1)
    return {"input": png(shown_input, 1), "grid": png(x)}


def attention(demo, req):
    """POST /api/attention: the first digit's cross-attention at step `step` of the same drawing,
    at the level of `size` (28, 14 or 7): each context token's weight per pixel, and where the
    label changes the output (|out(y) - out(null)|), over the x_t of that step."""
    model, y, scfg = sampling(demo, {**req, "strength": 1.0, "n": 1})
    ts = demo.diffusion.timesteps(scfg)
    step = number(req, "step", 1, len(ts), len(ts), int)
    size = number(req, "size", 1, 28, demo.sizes[0], int)
    if size not in demo.sizes:
        raise DemoError(f"size {size}: choose one of {', '.join(map(str, demo.sizes))}")
    with torch.inference_mode():
        for i, _, x_t, _, _ in film(demo, model, y, scfg):
            if i + 1 == step:
                break
    levels = by_level(attention_at(model, demo.diffusion, x_t, ts[step - 1], int(y[0]))[1])
    maps = torch.stack([b["weights"][0] for b in levels[size]]).mean(0)             # (L, H, W)
    steer = torch.stack([steering(b) for b in levels[size]]).mean(0)[None]          # (1, H, W)
    names = [f"token {i}" for i in range(len(maps))] + ["where the label acts"]
    return {"t": ts[step - 1], "x_t": png(x_t, 1),
            "maps": [overlay(x_t[0, 0], m) for m in torch.cat([maps, steer])], "names": names}


def overlay(image, heat):
    """A map (h, w) over a digit (28, 28): the map in colour (magma), from its lowest value (dark)
    to its highest (bright), with the digit's strokes in grey on top."""
    from matplotlib import colormaps
    from PIL import Image
    h = torch.nn.functional.interpolate(heat[None, None].float(), size=(28, 28), mode="nearest")[0, 0]
    h = ((h - h.min()) / (h.max() - h.min()).clamp_min(1e-12)).numpy()
    rgb = colormaps["magma"](h)[..., :3]
    ink = ((image.clamp(-1, 1) + 1) / 2).cpu().numpy()[..., None]
    a = (255 * (0.7 * rgb + 0.3 * ink)).round().astype(np.uint8)
    return data_url(Image.fromarray(a).resize((28 * ZOOM, 28 * ZOOM), Image.NEAREST))


def info(demo, req):
    """GET /api/info: what the page may offer."""
    return {"adapters": list(demo.models), "source": demo.source, "limits": LIMITS, "samplers": SAMPLERS,
            "steps": min(LIMITS["steps"], demo.diffusion.T), "sizes": demo.sizes}


def read_knobs(path, req):
    """The knobs this request's route reads for its mode and adapter, and the words that say so: a
    knob that would be ignored (keep in img2img, strength in inpaint, scale with no adapter) is refused."""
    knobs, where = set(KNOBS[path]), []
    mode = req.get("mode") if path == "/api/edit" and isinstance(req.get("mode"), str) else None
    unread = {"img2img": "keep", "inpaint": "strength"}.get(mode)      # another mode is refused by edit()
    if unread:
        knobs.discard(unread)
        where.append(f"in mode {mode}")
    if req.get("adapter", "none") == "none" and "scale" in knobs:
        knobs.discard("scale")
        where.append("with no adapter")
    return knobs, "".join(" " + w for w in where)


ROUTES = {"/api/generate": generate, "/api/edit": edit, "/api/attention": attention, "/api/info": info}
SHARED = {"label", "guidance", "sampler", "steps", "seed", "n", "adapter", "scale"}     # what the page sends
KNOBS = {"/api/generate": SHARED, "/api/edit": SHARED | {"pixels", "mode", "keep", "strength"},
         "/api/attention": SHARED - {"n"} | {"step", "size"}, "/api/info": set()}   # attention: one digit


# ----- the server -----

def pumped(lock, events):
    """The events of a generator, computed while holding the lock in a thread of their own, as fast as
    they come, and handed out from a queue: a page that reads slowly never holds the model."""
    handoff = queue.Queue()

    def work():
        try:
            with lock:
                for event in events:
                    handoff.put((True, event))
        except Exception as e:
            handoff.put((False, e))
        handoff.put((True, None))
    threading.Thread(target=work, daemon=True).start()
    while True:
        ok, event = handoff.get()
        if not ok:
            raise event
        if event is None:
            return
        yield event


def first_then(first, rest):
    """`first`, then the rest of a generator (closing this closes it)."""
    yield first
    yield from rest


def handle(demo, path, body):
    """One request -> (status, a JSON-able result, or for the film an iterator of events whose first
    one is already computed). Bad requests are 400 with a message for the page."""
    if path not in ROUTES:
        return 404, {"error": f"{path}: no such request"}
    try:
        req = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return 400, {"error": "the request is not JSON"}
    if not isinstance(req, dict):
        return 400, {"error": "the request must be a JSON object"}
    knobs, where = read_knobs(path, req)
    unknown = sorted(set(req) - knobs)
    if unknown:
        return 400, {"error": f"{unknown[0][:40]}: not a knob of {path}{where} ({', '.join(sorted(knobs))})"}
    try:
        if path == "/api/info":                                  # needs no model: never waits for one
            return 200, info(demo, req)
        if path == "/api/generate":
            events = pumped(demo.lock, generate(demo, req))
            return 200, first_then(next(events), events)      # a bad request fails here, before any reply
        with demo.lock:
            return 200, ROUTES[path](demo, req)
    except (DemoError, SamplingError, ValueError) as e:
        return 400, {"error": str(e).splitlines()[0]}
    except Exception as e:                      # a bug: the page says so, the server goes on serving
        print(f"demo.py: {path} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 500, {"error": f"the demo failed on this request ({type(e).__name__}); see the server's terminal"}


class Handler(BaseHTTPRequestHandler):
    """The page's files, and the requests of ROUTES for self.demo (set by make_handler)."""
    demo = None
    timeout = 120                     # seconds a socket may stall: a page that stops reading frees the model

    def do_GET(self):
        self.path = self.path.split("?")[0]
        if self.path in FILES:
            name, kind = FILES[self.path]
            with open(os.path.join(PAGE, name), "rb") as f:
                self.reply(200, f.read(), kind)
        elif self.path == "/api/info":
            self.reply_json(*handle(self.demo, self.path, b"{}"))
        else:
            self.reply_json(404, {"error": f"{self.path}: not found"})

    def do_POST(self):
        if self.headers.get("Transfer-Encoding"):
            return self.reply_json(411, {"error": "send the request with a Content-Length, not in chunks"})
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self.reply_json(400, {"error": "Content-Length is not a number"})
        if not 0 <= size <= LIMITS["body"]:
            return self.reply_json(413, {"error": f"the request must be at most {LIMITS['body']:,} bytes"})
        status, result = handle(self.demo, self.path, self.rfile.read(size))
        if isinstance(result, dict):
            return self.reply_json(status, result)
        self.send_response(200)                                  # the film: one JSON line per step, as drawn
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for event in result:
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()
        except (DemoError, SamplingError, ValueError) as e:     # e.g. non-finite x_t at a late step
            self.wfile.write(json.dumps({"error": str(e).splitlines()[0]}).encode() + b"\n")
        finally:
            result.close()

    def reply_json(self, status, obj):
        self.reply(status, json.dumps(obj).encode(), "application/json")

    def reply(self, status, data, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # the page went away: nothing to do
            self.close_connection = True

    def log_message(self, fmt, *args):            # quiet: the page shows what matters
        pass


def make_handler(demo):
    """A request handler class serving `demo`."""
    return type("DemoHandler", (Handler,), {"demo": demo})


def parse_args(argv=None):
    """demo.py's flags, checked."""
    p = Parser(prog="demo.py", description="Play with the model in your browser, on this machine only.")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1, this machine only); another opens the page "
                        "to your network")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"the model (default: {DEFAULT_CHECKPOINT}, or the shipped weights/model.safetensors when absent)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE", help="also offer this adapter; repeatable")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise DemoError(f"--port {args.port}: must be between 0 and 65535")
    try:
        socket.getaddrinfo(args.host, None)
    except (OSError, UnicodeError):
        args.host = None
    if not args.host:
        raise DemoError("--host: give an address of this machine, such as 127.0.0.1 (the default) or 0.0.0.0")
    return args


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64                    # connections waiting while one request computes


def serve(host, port, demo):
    """The HTTP server on host:port (IPv6 when the host has a colon)."""
    server_class = type("Server6", (Server,), {"address_family": socket.AF_INET6}) if ":" in host else Server
    try:
        return server_class((host, port), make_handler(demo))
    except (OSError, OverflowError) as e:
        raise DemoError(f"cannot serve on {host}:{port} ({getattr(e, 'strerror', None) or e}); "
                        "try another --port or --host") from e


def main(argv=None):
    """Load the model and its adapters, then serve the page until Ctrl-C."""
    args = parse_args(argv)
    demo = load_demo(args, pick_device(args.device))
    server = serve(args.host, args.port, demo)
    if not (args.host == "localhost" or ipaddress.ip_address(socket.getaddrinfo(args.host, None)[0][4][0]).is_loopback):
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the page")
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(args.host, f"[{args.host}]" if ":" in args.host else args.host)
    print(f"the demo is at http://{host}:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:                  # a request may be computing in a thread: leave at once, as one line
        sys.stdout.flush()
        os.write(2, b"demo.py: interrupted\n")
        os._exit(130)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
