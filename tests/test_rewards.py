"""Rewards for online training: the flags, weighted totals of the toy rules on drawn scenes, the
per-step statistics, and the reward server over real HTTP (a server process on localhost; a
flaky server thread for the client's timeouts and retries)."""

from __future__ import annotations

import json
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import cli
from evaluation import reward_server
from evaluation.reward_client import RemoteReward, RewardServerError
from evaluation.rewards import (
    REWARD_NAMES,
    RewardScores,
    ScorerReward,
    parse_reward_specs,
    reward_stats,
)
from scripts.build_toy_data import BACKGROUNDS, draw_shape

REPO = Path(__file__).resolve().parents[1]
TOY_REWARDS = ["toy_colour", "toy_shape", "toy_warm"]
WEIGHTS = "0.5,1,2"

# colour, shape, background, prompt, and what the rules must say (colour, shape, warm). Warm:
# a 20 px red circle on white lifts mean red - mean blue to ~58 and a 20 px orange triangle on
# black to ~44 (both >= WARM_MARGIN 20); blue on white and green on gray are cool.
SCENES = [
    ("red", "circle", "white", "a red circle on a white background", (1, 1, 1)),
    ("blue", "square", "white", "a red square on a white background", (0, 1, 0)),
    ("orange", "triangle", "black", "an orange circle on a black background", (1, 0, 1)),
    ("green", "square", "gray", "a green square on a gray background", (1, 1, 0)),
]
# 0.5 colour + 1 shape + 2 warm, per scene above
HAND_TOTALS = [3.5, 1.0, 2.5, 1.5]


def draw(colour: str, shape: str, background: str) -> Image.Image:
    """A toy scene as scripts/build_toy_data.py draws them, at a fixed place and size."""
    image = Image.new("RGB", (32, 32), BACKGROUNDS[background])
    return draw_shape(image, colour, shape, left=6, top=6, side=20)


@pytest.fixture(scope="module")
def scenes() -> tuple[list[Image.Image], list[str]]:
    return [draw(c, s, b) for c, s, b, _, _ in SCENES], [p for *_, p, _ in SCENES]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Flags -----------------------------------------------------------------------------------------


def test_reward_flags_parse_names_paths_and_weights():
    specs = parse_reward_specs(["toy_colour", "pickscore=/m/pick", "hpsv2=/m/hps"], ["0.5,2", "-1"])
    assert [(s.name, s.path, s.weight) for s in specs] == [
        ("toy_colour", None, 0.5),
        ("pickscore", "/m/pick", 2.0),
        ("hpsv2", "/m/hps", -1.0),
    ]
    # default weights 1; pickscore falls back to its hub name, so no path is needed
    specs = parse_reward_specs(["toy_warm", "pickscore"])
    assert [(s.name, s.path, s.weight) for s in specs] == [
        ("toy_warm", None, 1.0),
        ("pickscore", None, 1.0),
    ]
    assert parse_reward_specs(["toy_warm"], "3")[0].weight == 3.0


@pytest.mark.parametrize(
    ("rewards", "weights", "message"),
    [
        (["toy_color"], None, "--reward 'toy_color': unknown reward; choose from"),
        (["toy_colour", "toy_warm"], ["1"], "--reward_weights: 1 weights [1.0] for 2 --reward"),
        (["toy_colour"], ["1", "2"], "--reward_weights: 2 weights"),
        (["toy_colour"], ["x"], "--reward_weights: 'x' is not a number"),
        (["toy_colour"], ["nan"], "--reward_weights: 'nan' is not a finite number"),
        (["aesthetic"], None, "--reward aesthetic needs its model: --reward aesthetic=DIR"),
        (["toy_warm=/m"], None, "toy_warm is a rule and takes no model path"),
        (["toy_warm", "toy_warm"], None, "--reward: each reward at most once"),
        ([], None, "give at least one --reward"),
    ],
)
def test_reward_flag_mistakes_are_one_line_usage_errors(rewards, weights, message):
    with pytest.raises(cli.UsageError) as error:
        parse_reward_specs(rewards, weights)
    assert message in str(error.value) and "\n" not in str(error.value)
    if "unknown reward" in message:
        assert str(list(REWARD_NAMES)) in str(error.value)


def test_server_command_answers_an_unknown_reward_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(reward_server.main, ["serve", "--reward", "nope", "--port", "0"], prog="srv")
    assert exit_.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "srv: error: --reward 'nope': unknown reward" in err
    assert "toy_colour" in err


# In process ------------------------------------------------------------------------------------


def test_weighted_total_is_the_hand_computed_sum_of_the_toy_rules(scenes):
    images, prompts = scenes
    reward = ScorerReward.from_flags(TOY_REWARDS, [WEIGHTS])
    scores = reward.score(images, prompts, metadata=[{"id": i} for i in range(len(images))])
    assert reward.names == TOY_REWARDS
    for index, name in enumerate(TOY_REWARDS):
        expected = [float(scene[-1][index]) for scene in SCENES]
        assert scores.components[name].tolist() == expected, name
    assert scores.total.dtype == torch.float32 and scores.total.tolist() == HAND_TOTALS
    with pytest.raises(ValueError, match="4 images, 3 prompts"):
        reward.score(images, prompts[:3])


def test_check_prompts_names_the_first_prompt_a_rule_cannot_read():
    reward = ScorerReward.from_flags(TOY_REWARDS)
    reward.check_prompts(["a red circle on a white background"])
    with pytest.raises(cli.UsageError) as error:
        reward.check_prompts(["a red circle", "a circle on a white background", "a blob"])
    text = str(error.value)
    assert text.startswith("--reward toy_colour: prompt 1: caption names no palette colour")
    assert "'a circle on a white background'" in text and "\n" not in text
    # the first bad prompt decides, whichever reward it fails
    with pytest.raises(cli.UsageError, match=r"--reward toy_shape: prompt 0: .*'a red blob'"):
        reward.check_prompts(["a red blob", "a circle"])
    ScorerReward.from_flags(["toy_warm"]).check_prompts(["anything at all"])  # reads no caption


def test_reward_stats_by_hand_with_three_groups():
    """Groups a = [1, 1] and c = [2, 2] have no spread, b = [0, 1] has: 2 of 3 groups. Totals
    0, 1, 2, 1, 2, 1: mean 7/6, population variance (49 + 1 + 25 + 1 + 25 + 1) / 36 / 6 = 17/36."""
    scores = RewardScores(
        total=torch.tensor([0.0, 1, 2, 1, 2, 1]),
        components={"toy_colour": torch.tensor([1.0, 0, 1, 0, 1, 1])},
    )
    expected = {
        "reward/mean": 7 / 6,
        "reward/std": math.sqrt(17) / 6,
        "reward/zero_spread_groups": 2 / 3,
        "reward/toy_colour": 4 / 6,
    }
    for ids in (["b", "a", "c", "a", "c", "b"], torch.tensor([1, 0, 2, 0, 2, 1])):
        stats = reward_stats(scores, ids)
        assert stats.keys() == expected.keys()
        for key, value in expected.items():
            assert stats[key] == pytest.approx(value, abs=1e-12), key
    # a group that gets a second value is no longer flat
    assert reward_stats(scores, [0, 0, 1, 1, 2, 2])["reward/zero_spread_groups"] == 0.0


# The server process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("reward-server") / "stderr.txt"
    command = [sys.executable, "-m", "evaluation.reward_server", "serve", "--port", "0",
               "--device", "cpu", "--reward_weights", WEIGHTS]  # fmt: skip
    command += [flag for name in TOY_REWARDS for flag in ("--reward", name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("reward server listening on http://127.0.0.1:"), (
            line + log.read_text()
        )
        yield line.split()[4]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_server_scores_equal_the_in_process_scores_exactly(server_url, scenes):
    images, prompts = scenes
    local = ScorerReward.from_flags(TOY_REWARDS, [WEIGHTS]).score(images, prompts)
    remote = RemoteReward(server_url, batch_size=3)  # 4 images: two requests
    remote.check()
    assert remote.names == TOY_REWARDS
    scores = remote.score(images, prompts, metadata=[{"id": i} for i in range(4)])
    assert torch.equal(scores.total, local.total) and scores.total.tolist() == HAND_TOTALS
    assert scores.components.keys() == local.components.keys()
    for name, values in local.components.items():
        assert torch.equal(scores.components[name], values), name
    # the client's own weights, in its own order of names, combine as in process
    mine = RemoteReward(server_url, names=["toy_warm", "toy_colour", "toy_shape"], weights="1,3,0")
    ours = ScorerReward.from_flags(["toy_warm", "toy_colour", "toy_shape"], "1,3,0")
    assert torch.equal(mine.score(images, prompts).total, ours.score(images, prompts).total)


def test_server_refuses_bad_requests_with_one_line(server_url, scenes):
    images, _ = scenes
    remote = RemoteReward(server_url, retries=3, backoff=5.0)  # a 400 must not be retried
    start = time.monotonic()
    with pytest.raises(RewardServerError) as error:
        remote.score(images[:1], ["a circle on a white background"])
    text = str(error.value)
    assert time.monotonic() - start < 5.0
    assert text.startswith(f"--reward_url {server_url}: POST /score refused (HTTP 400): ")
    assert "--reward toy_colour: prompt 0:" in text and "\n" not in text
    with pytest.raises(RewardServerError, match=r"POST /check refused .* 'a square'"):
        remote.check_prompts(["a red square", "a square"])
    with pytest.raises(cli.UsageError, match=r"serves .*, not the --reward list \['toy_colour'\]"):
        RemoteReward(server_url, names=["toy_colour"]).check()
    with pytest.raises(cli.UsageError, match="--reward_weights: 2 weights"):
        RemoteReward(server_url, weights="1,2").check()
    request = urllib.request.Request(server_url + "/score", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 400
    message = json.loads(answer.value.read())["error"]
    assert message.startswith("the body is not JSON") and "\n" not in message
    body = json.dumps({"images": ["bm90IGEgcG5n"], "prompts": ["a red square"]}).encode()
    request = urllib.request.Request(server_url + "/score", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert json.loads(answer.value.read()) == {"error": "images[0] is not a base64-encoded PNG"}


def test_an_unreachable_server_stops_the_run_with_one_line_quickly():
    url = f"http://127.0.0.1:{free_port()}"
    remote = RemoteReward(url, timeout=1.0, retries=2, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(cli.UsageError) as error:
        remote.check()
    assert time.monotonic() - start < 3.0
    text = str(error.value)
    assert text.startswith(f"--reward_url {url}: reward server unreachable or failing: ")
    assert "GET /health tried 3 times" in text and "refused" in text and "\n" not in text


# Retries against a flaky server thread -----------------------------------------------------------


class FlakyHandler(BaseHTTPRequestHandler):
    """POST /score answers the server's scripted statuses in turn (then 200); "slow" sleeps
    past the client's timeout before answering."""

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.answer(200, {"rewards": ["toy_warm"]})

    def do_POST(self) -> None:
        count = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
        script = self.server.script
        step = script.pop(0) if script else 200
        self.server.posts += 1
        if step == "slow":
            time.sleep(1.0)
            step = 200
        if step != 200:
            self.answer(step, {"error": f"scripted {step}"})
            return
        self.answer(200, {"total": [0.25] * count, "components": {"toy_warm": [0.5] * count}})


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.daemon_threads = True
    server.script, server.posts = [], 0
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_client_retries_a_503_after_backing_off(flaky, scenes):
    images, prompts = scenes
    flaky.script = [503]
    remote = RemoteReward(f"http://127.0.0.1:{flaky.server_address[1]}", retries=2, backoff=0.3)
    start = time.monotonic()
    scores = remote.score(images[:2], prompts[:2])
    assert time.monotonic() - start >= 0.3
    assert flaky.posts == 2
    assert scores.total.tolist() == [0.25, 0.25]
    assert scores.components["toy_warm"].tolist() == [0.5, 0.5]


def test_client_retries_a_timed_out_request(flaky, scenes):
    images, prompts = scenes
    flaky.script = ["slow"]
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    scores = RemoteReward(url, timeout=0.3, retries=1, backoff=0.0).score(images[:1], prompts[:1])
    assert flaky.posts == 2 and scores.total.tolist() == [0.25]


def test_client_gives_up_after_its_retries_and_never_retries_a_400(flaky, scenes):
    images, prompts = scenes
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    flaky.script = [503, 500, 503]
    with pytest.raises(RewardServerError) as error:
        RemoteReward(url, retries=2, backoff=0.01).score(images[:1], prompts[:1])
    assert flaky.posts == 3
    assert str(error.value).endswith("POST /score tried 3 times, last: HTTP 503: scripted 503")
    flaky.script, flaky.posts = [400], 0
    with pytest.raises(RewardServerError, match=r"refused \(HTTP 400\): scripted 400$"):
        RemoteReward(url, retries=2, backoff=0.01).score(images[:1], prompts[:1])
    assert flaky.posts == 1
