"""The trainer's side of a reward server (evaluation/reward_server.py): ``--reward_url``.

``RemoteReward`` has the in-process reward's interface (evaluation/rewards.py). It sends
images as base64 PNG in batches of ``batch_size``, waits at most ``timeout`` seconds for each
request, and repeats a request that could not connect, timed out or got a 5xx answer up to
``retries`` more times, sleeping ``backoff``, ``2 backoff``, ``4 backoff``, ... seconds between
tries (scoring is idempotent, so a repeat is safe). A 4xx answer is a bad request that a repeat
cannot fix: its one-line message from the server is raised at once. Every failure is one line
(``RewardServerError``, a UsageError) naming the URL. Environment proxies are not used: a
reward server is the run's own infrastructure, usually on localhost or the cluster network.

``check()`` (call it at start-up) asks the server which rewards it serves, stops the run with
one line when it is unreachable, and fits ``--reward`` / ``--reward_weights`` to them: with
weights the client combines the components itself (the server's total uses the server's own
weights); without, it takes the server's total.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import torch
from PIL import Image

from common.cli import UsageError, one_line
from evaluation.rewards import (
    Metadata,
    RewardScores,
    check_lengths,
    combine,
    parse_weights,
    split_reward,
)
from evaluation.scorers import Images, Prompts

DEFAULT_BATCH_SIZE = 32
DEFAULT_TIMEOUT_S = 120.0  # one batch of a large reward model on a busy GPU
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 1.0
PNG_COMPRESS_LEVEL = 1  # lossless at any level; 1 is the fastest to encode


class RewardServerError(UsageError):
    """The reward server is unreachable, failing, or refused a request; the message is one
    line naming the URL."""


def encode_image(image: Image.Image) -> str:
    """An image as base64 PNG (RGB): lossless, so the server scores exactly these pixels."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` line, or the HTTP reason for other servers."""
    try:
        return one_line(ValueError(json.loads(error.read())["error"]))
    except (ValueError, KeyError, TypeError, OSError):
        return str(error.reason)


class RemoteReward:
    """The rewards of the server at ``url``, with the interface of ``ScorerReward``.

    ``names``: the run's ``--reward`` names (NAME[=PATH]; paths are the server's business);
    when given, the server must serve exactly these. ``weights``: ``--reward_weights`` in the
    order of ``names`` (or of the server's list when ``names`` is empty)."""

    def __init__(
        self,
        url: str,
        names: Sequence[str] = (),
        weights: Sequence[str | float] | str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
    ):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--reward_url {url!r}: give an http:// or https:// URL")
        if batch_size < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise UsageError(
                f"--reward_url {url}: batch size {batch_size} must be >= 1, timeout {timeout} "
                f"> 0, retries {retries} >= 0 and backoff {backoff} >= 0"
            )
        self.url = url.rstrip("/")
        self.expected = [split_reward(value)[0] for value in names]
        self.raw_weights = weights
        self.batch_size, self.timeout, self.retries, self.backoff = (
            batch_size, timeout, retries, backoff,
        )  # fmt: skip
        self.names: list[str] = []  # filled by check()
        self.weights: dict[str, float] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, path: str, payload: dict | None = None) -> dict:
        """One JSON request (GET without payload, POST with), repeated as the docstring says."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        method = "GET" if data is None else "POST"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url + path,
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code < 500:
                    raise RewardServerError(
                        f"--reward_url {self.url}: {method} {path} refused (HTTP {exc.code}): "
                        f"{message}"
                    ) from None
                last = f"HTTP {exc.code}: {message}"
                continue
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
                last = one_line(getattr(exc, "reason", None) or exc)
                continue
            try:
                return json.loads(body)
            except ValueError:
                raise RewardServerError(
                    f"--reward_url {self.url}: {method} {path} answered with something other "
                    "than JSON; is this a reward server (python -m evaluation.reward_server)?"
                ) from None
        raise RewardServerError(
            f"--reward_url {self.url}: reward server unreachable or failing: {method} {path} "
            f"tried {self.retries + 1} times, last: {last}"
        )

    def check(self) -> None:
        """Ask the server for its rewards and fit --reward / --reward_weights to them."""
        served = self._request("/health").get("rewards")
        if not isinstance(served, list):
            raise RewardServerError(f"--reward_url {self.url}: /health names no rewards")
        if self.expected and sorted(self.expected) != sorted(served):
            raise UsageError(
                f"--reward_url {self.url} serves {served}, not the --reward list {self.expected}"
            )
        self.names = self.expected or list(served)
        if self.raw_weights is not None:
            weights = parse_weights(self.raw_weights, len(self.names))
            self.weights = dict(zip(self.names, weights, strict=True))

    def check_prompts(self, prompts: Prompts) -> None:
        """The server's check of the prompts; its one-line refusal names the first bad one."""
        self._request("/check", {"prompts": list(prompts)})

    def score(self, images: Images, prompts: Prompts, metadata: Metadata = None) -> RewardScores:
        if not self.names:
            self.check()
        check_lengths(images, prompts, metadata)
        totals: list[float] = []
        parts: dict[str, list[float]] = {name: [] for name in self.names}
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            payload = {
                "images": [encode_image(image) for image in images[start:end]],
                "prompts": list(prompts[start:end]),
                "metadata": None if metadata is None else list(metadata[start:end]),
            }
            answer = self._request("/score", payload)
            count = len(payload["images"])
            try:
                batch_total = [float(x) for x in answer["total"]]
                batch_parts = {n: [float(x) for x in answer["components"][n]] for n in parts}
            except (KeyError, TypeError, ValueError) as exc:
                raise RewardServerError(
                    f"--reward_url {self.url}: /score answer lacks {one_line(exc)}"
                ) from None
            if any(len(v) != count for v in (batch_total, *batch_parts.values())):
                raise RewardServerError(f"--reward_url {self.url}: /score gave a wrong count")
            totals += batch_total
            for name, values in batch_parts.items():
                parts[name] += values
        components = {name: torch.tensor(v, dtype=torch.float32) for name, v in parts.items()}
        if self.weights is not None:
            return combine(components, self.weights)
        return RewardScores(torch.tensor(totals, dtype=torch.float32), components)
