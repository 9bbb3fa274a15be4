"""`POST /v1/chat/completions` over real HTTP: OpenAI's request and response, and every refusal.

The served run is the tiny vlm-sft run of tests/test_chat.py (it answers a square's colour); the
reference for each answer is the run's own task `chat` on the same conversation, called here.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from mmtune.serve import Backend, ServeConfig, create_app
from tests.test_chat import QUESTION, chat_world
from tests.test_serve import LiveServer, bomb_png, make_run, raw_request, wait_ready

ROUTE = "/v1/chat/completions"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return chat_world(tmp_path_factory.mktemp("serve_chat"))


@pytest.fixture(scope="module")
def server(world):
    cfg = ServeConfig(max_images=2, max_new_tokens=8, max_body_bytes=100_000, max_image_pixels=100_000)
    with LiveServer(create_app(Backend.from_run(world["run"]), cfg)) as s:
        yield s


def data_uri(world, name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((world["root"] / f"{name}.png").read_bytes()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(world, name: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [image_part(data_uri(world, name)), {"type": "text", "text": text}]}


def task_reply(world, messages, images, **settings) -> dict:
    return world["task"].chat(world["model"], messages, images, {"max_new_tokens": 8, **settings})


def test_greedy_answer_is_the_tasks_own_in_openai_format(server, world):
    """A system turn, an image part then a text part: the answer is the task's chat on the same
    conversation (an image part then text reads `<image>\\n` + text), in chat.completion form."""
    body = {
        "model": "my-vlm",
        "messages": [{"role": "system", "content": "Answer in one word."}, ask(world, "red")],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = httpx.post(server.url + ROUTE, json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": f"<image>\n{QUESTION}"},
    ]
    want = task_reply(world, messages, [world["red"]])
    assert want["text"] == "red" and want["finish_reason"] == "stop"
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-") and got["model"] == "my-vlm"
    assert abs(got["created"] - time.time()) < 600
    (choice,) = got["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": want["text"]}
    assert choice["finish_reason"] == "stop"
    total = want["prompt_tokens"] + want["completion_tokens"]
    assert got["usage"] == {
        "prompt_tokens": want["prompt_tokens"],
        "completion_tokens": want["completion_tokens"],
        "total_tokens": total,
    }


def test_multi_turn_with_two_images_and_a_cut_reply(server, world):
    """A second image in a later turn (text part first) answers as the task does; max_tokens=1
    cuts the reply: finish_reason "length"; `max_completion_tokens` is read the same way."""
    turns = [ask(world, "red"), {"role": "assistant", "content": "red"}]
    turns.append(
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(data_uri(world, "blue"))]}
    )
    r = httpx.post(server.url + ROUTE, json={"messages": turns}, timeout=60)
    assert r.status_code == 200, r.text
    messages = [
        {"role": "user", "content": f"<image>\n{QUESTION}"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And this one?\n<image>"},
    ]
    want = task_reply(world, messages, [world["red"], world["blue"]])
    assert r.json()["choices"][0]["message"]["content"] == want["text"]
    assert r.json()["usage"]["prompt_tokens"] == want["prompt_tokens"]
    for key in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(server.url + ROUTE, json={"messages": [ask(world, "red")], key: 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 1


def test_sampling_with_a_seed_is_the_tasks(server, world):
    body = {"messages": [ask(world, "blue")], "temperature": 1.0, "seed": 3, "max_tokens": 6}
    a, b = (httpx.post(server.url + ROUTE, json=body, timeout=60).json() for _ in range(2))
    want = task_reply(
        world,
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        [world["blue"]],
        temperature=1.0,
        seed=3,
        max_new_tokens=6,
    )
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"] == want["text"]


def test_models_lists_the_served_run(server, world):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 200
    (entry,) = r.json()["data"]
    assert r.json()["object"] == "list" and entry["object"] == "model" and entry["id"] == world["run"].name


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": QUESTION}
BAD = [
    ("malformed-json", b"{not json", 400, "invalid_json"),
    ("not-an-object", [1, 2], 400, "invalid_json"),
    ("unknown-role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_role"),
    ("no-messages", {"messages": []}, 400, "invalid_value"),
    ("missing-messages", {"model": "x"}, 400, "invalid_value"),
    ("unknown-field", {"messages": [{"role": "user", "content": "x"}], "top_p": 0.5}, 400, "unsupported_field"),
    (
        "unknown-message-field",
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "unsupported_field",
    ),
    ("bad-part", _user({"type": "audio", "audio": "x"}), 400, "invalid_value"),
    ("content-not-text", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
    ("image-mark-in-text", {"messages": [{"role": "user", "content": "<image> hi"}]}, 400, "invalid_value"),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_value"),
    ("remote-url", _user(image_part("http://example.com/cat.png"), TEXT), 400, "invalid_image_url"),
    ("file-url", _user(image_part("file:///etc/passwd"), TEXT), 400, "invalid_image_url"),
    ("not-image-media", _user(image_part("data:text/plain;base64,aGk="), TEXT), 400, "invalid_image_url"),
    ("bad-base64", _user(image_part("data:image/png;base64,@@@"), TEXT), 400, "invalid_image"),
    ("undecodable", _user(image_part(_png_uri(b"<html>not an image</html>")), TEXT), 400, "invalid_image"),
    ("bomb", _user(image_part(_png_uri(bomb_png())), TEXT), 413, "image_too_large"),
    ("too-many-images", _user(*[image_part("data:image/png;base64,AA==")] * 3, TEXT), 413, "too_many_images"),
    ("image-from-assistant", {"messages": [{"role": "assistant", "content": [image_part("x")]}]}, 400, "invalid_value"),
    (
        "max-tokens-over-cap",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9},
        400,
        "max_tokens_too_large",
    ),
    ("max-tokens-zero", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "invalid_value"),
    ("temperature-negative", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "invalid_value"),
    ("n-two", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_value"),
    ("stream", {"messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream_unsupported"),
    (
        "ends-with-assistant",
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        400,
        "invalid_request",
    ),
    (
        "past-the-runs-length",
        {"messages": [{"role": "user", "content": "word " * 200}]},
        400,
        "invalid_request",
    ),
]


@pytest.mark.parametrize(("body", "status", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_request_gets_its_4xx_and_an_openai_error(server, body, status, code):
    """Malformed JSON, unknown roles and fields, remote / non-image / undecodable images, too
    many or too large images, max_tokens over the cap, stream, a conversation ending with the
    assistant or past the run's length: the right 4xx with OpenAI's error object, and the server
    answers the next request."""
    if isinstance(body, bytes):
        r = httpx.post(server.url + ROUTE, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(server.url + ROUTE, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"], error
    assert httpx.get(server.url + "/health/ready").status_code == 200


def test_body_over_the_limit_is_413_in_openai_form(server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    status, data = raw_request(server.url, head)
    assert status == 413
    error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "invalid_request_error" and "limit" in error["message"]
    big = {"messages": [{"role": "user", "content": "x" * 150_000}]}  # no Content-Length check: read and cut
    r = httpx.post(server.url + ROUTE, json=big, timeout=60)
    assert r.status_code == 413 and "error" in r.json() and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key_and_other_routes_keep_their_error_forms(world):
    """With an API key: 401 in OpenAI's form on the chat route (type authentication_error); the
    other routes keep mmtune's `{"error", "status"}`."""
    cfg = ServeConfig(max_new_tokens=8)
    with LiveServer(create_app(Backend.from_run(world["run"]), cfg, api_key="k")) as s:
        r = httpx.post(s.url + ROUTE, json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(
            s.url + ROUTE, json={"messages": [ask(world, "red")]}, headers={"authorization": "Bearer k"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "red"
        r = httpx.post(s.url + "/v1/embed", json={"texts": ["x"]})
        assert r.status_code == 401 and r.json()["status"] == 401


def test_a_run_that_does_not_chat_answers_404(tmp_path):
    run = make_run(tmp_path / "clip")
    with LiveServer(create_app(Backend.from_run(run), ServeConfig())) as s:
        r = httpx.post(s.url + ROUTE, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "does not chat" in r.json()["error"]["message"]


def test_generation_past_the_timeout_is_504_and_frees_the_model(world):
    """Each model step made to take 0.2 s and no end of reply: 8 tokens would take 1.6 s, past the 0.5 s
    timeout → 504 at the timeout; generation itself stops then (the model thread is free), so
    the next, one-token request is answered within its own 0.5 s."""
    backend = Backend.from_run(world["run"])
    backend.model.generation_config.eos_token_id = None  # it replies "red" and would stop: now it goes on
    backend.model.register_forward_pre_hook(lambda module, args: time.sleep(0.2))
    cfg = ServeConfig(request_timeout_s=0.5, max_new_tokens=8)
    with LiveServer(create_app(backend, cfg)) as s:
        wait_ready(s.url)
        r = httpx.post(s.url + ROUTE, json={"messages": [ask(world, "red")], "max_tokens": 8}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        r = httpx.post(s.url + ROUTE, json={"messages": [ask(world, "red")], "max_tokens": 1}, timeout=60)
        assert r.status_code == 200, r.text


def test_the_vlm_run_also_serves_its_predict_route(server, world):
    """Before: `mmtune serve` of a vlm-sft run failed while loading (the backend asked its LLaVA
    processor for a dual encoder's image transform), so /v1/predict/vlm-sft never answered."""
    files = {"image": ("q.png", (world["root"] / "blue.png").read_bytes())}
    r = httpx.post(server.url + "/v1/predict/vlm-sft", files=files, data={"inputs": json.dumps({"question": QUESTION})})
    assert r.status_code == 200, r.text
    want = world["task"].predict(world["model"], [{"image": world["blue"], "question": QUESTION}])
    assert r.json()["outputs"] == want == [{"answer": "blue"}]
    r = httpx.post(server.url + "/v1/embed", json={"texts": ["x"]})
    assert r.status_code == 404 and r.json()["status"] == 404  # mmtune's own error form there


class FailingChat(Backend):
    """Its model call raises on the word "boom" (a fault on demand)."""

    def chat(self, messages, images, settings):
        if "boom" in messages[-1]["content"]:
            raise RuntimeError("backend failure")
        return super().chat(messages, images, settings)


def test_a_failing_model_call_is_a_500_and_the_server_goes_on(world):
    base = Backend.from_run(world["run"])
    backend = FailingChat(base.model, base.processor, name="f", embeds=False, chat=base.chat_task)
    with LiveServer(create_app(backend, ServeConfig(max_new_tokens=8))) as s:
        r = httpx.post(s.url + ROUTE, json={"messages": [{"role": "user", "content": "boom"}]}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "backend failure" not in r.text  # the log has it, the client does not
        r = httpx.post(s.url + ROUTE, json={"messages": [ask(world, "red")]}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "red"
