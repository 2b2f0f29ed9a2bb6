"""Serve rewards over HTTP, so a large reward model runs in another process, GPU or machine.

    python -m evaluation.reward_server serve --reward pickscore=/models/PickScore_v1 \
        --reward toy_warm --reward_weights 1,0.5 --port 8765 [--host 127.0.0.1] [--device cuda]

Standard library only (``http.server``); one scoring at a time (the reward models are shared by
the request threads). Once listening it prints one line, ``reward server listening on URL
(names)``; ``--port 0`` picks a free port and that line names it. The trainer's client is
evaluation/reward_client.py (``--reward_url``).

Protocol (JSON in and out; every error is ``{"error": "one line"}``: 400 for a bad request or a
prompt a reward cannot read, 404 for an unknown path, 500 when scoring itself failed):

- ``GET /health`` -> ``{"rewards": [names], "weights": [floats]}``
- ``POST /score`` ``{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]
  or null}`` -> ``{"rewards": [names], "total": [float, ...], "components": {name: [float, ...]}}``
  (float32 values; total = the weighted sum of the components with the server's weights)
- ``POST /check`` ``{"prompts": [str, ...]}`` -> ``{"ok": true}``, or 400 naming the first prompt
  a reward cannot read
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, UnidentifiedImageError

from common import cli
from evaluation.rewards import (
    ScorerReward,
    add_reward_arguments,
    check_lengths,
    parse_reward_specs,
)

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the server cannot read; answered with 400 and this one-line message."""


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client does not keep the process alive at shutdown

    def __init__(self, address: tuple[str, int], reward: ScorerReward):
        super().__init__(address, RewardHandler)
        self.reward = reward
        # Request threads share the models: one batch on them at a time bounds memory.
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _strings(body: dict, key: str) -> list[str]:
    values = body.get(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(f'"{key}" must be a list of strings')
    return values


def decode_image(index: int, text: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        raise BadRequest(f"images[{index}] is not a base64-encoded PNG") from None


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer

    def reply(self, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a POST needs a Content-Length header and a JSON body")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        if self.path != "/health":
            self.reply(404, {"error": f"no GET {self.path}; the paths: GET /health, POST /score, "
                                      "POST /check"})  # fmt: skip
            return
        reward = self.server.reward
        self.reply(200, {"rewards": reward.names, "weights": [reward.weights[n] for n in
                                                              reward.names]})  # fmt: skip

    def do_POST(self) -> None:
        routes = {"/score": self.score, "/check": self.check}
        if self.path not in routes:
            self.reply(404, {"error": f"no POST {self.path}; the paths: GET /health, "
                                      "POST /score, POST /check"})  # fmt: skip
            return
        try:
            answer = routes[self.path](self.read_json())
        except (BadRequest, cli.UsageError) as exc:
            self.reply(400, {"error": cli.one_line(exc)})
        except Exception as exc:
            logger.exception("scoring failed")
            self.reply(500, {"error": f"scoring failed: {cli.one_line(exc)}"})
        else:
            self.reply(200, answer)

    def check(self, body: dict) -> dict:
        self.server.reward.check_prompts(_strings(body, "prompts"))
        return {"ok": True}

    def score(self, body: dict) -> dict:
        prompts = _strings(body, "prompts")
        encoded = _strings(body, "images")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, list) and all(isinstance(m, dict) for m in metadata)
        ):
            raise BadRequest('"metadata" must be null or a list of objects')
        try:
            check_lengths(encoded, prompts, metadata)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        images = [decode_image(i, text) for i, text in enumerate(encoded)]
        reward = self.server.reward
        reward.check_prompts(prompts)
        with self.server.lock:
            scores = reward.score(images, prompts, metadata)
        return {
            "rewards": reward.names,
            "total": scores.total.tolist(),
            "components": {name: values.tolist() for name, values in scores.components.items()},
        }


def parse_args(argv: Sequence[str] | None):
    parser = cli.Parser(
        prog="python -m evaluation.reward_server",
        description="Serve rewards (evaluation/scorers.py) over HTTP.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="score POSTed images until interrupted")
    add_reward_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, required=True, help="port (0: any free port)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    specs = parse_reward_specs(args.reward, args.reward_weights)
    cli.setup_logging()
    reward = ScorerReward(specs, args.device)
    try:
        server = RewardServer((args.host, args.port), reward)
    except OSError as exc:
        reason = exc.strerror or cli.one_line(exc)
        raise cli.UsageError(f"--host {args.host} --port {args.port}: {reason}") from None
    print(f"reward server listening on {server.url} ({', '.join(reward.names)})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run(main, prog="python -m evaluation.reward_server")
