"""The official openai and ollama Python clients, unmodified, talking to corral over TLS."""

import ssl

import httpx
import ollama
import openai
import pytest


def openai_client(gw, api_key=None):
    api_key = api_key or gw.keys["research"]
    return openai.OpenAI(base_url=f"{gw.base}/v1", api_key=api_key, http_client=httpx.Client(verify=ssl.create_default_context(cafile=gw.ca)), max_retries=0)


def ollama_client(gw, key=None, **kw):
    key = key or gw.keys["research"]
    return ollama.Client(
        host=gw.base, verify=ssl.create_default_context(cafile=gw.ca), headers={"Authorization": f"Bearer {key}"}, **kw
    )


def test_openai_chat(gateway):
    r = openai_client(gateway).chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "Why is the sky blue?"}]
    )
    assert r.choices[0].message.content.startswith("The sky is blue")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12


def test_openai_streaming_chat(gateway):
    stream = openai_client(gateway).chat.completions.create(
        model="llama3.2", stream=True, messages=[{"role": "user", "content": "Hello"}]
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(parts) > 10
    assert "".join(parts).startswith("The sky is blue")


def test_openai_streaming_with_usage(gateway):
    stream = openai_client(gateway).chat.completions.create(
        model="llama3.2",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hello there"}],
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_embeddings(gateway):
    r = openai_client(gateway).embeddings.create(model="nomic-embed-text", input=["one", "two"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8


def test_openai_models_are_the_teams(gateway):
    ids = [m.id for m in openai_client(gateway).models.list()]
    assert ids == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert "qwen2.5-coder:7b" in [m.id for m in openai_client(gateway, gateway.keys["ops"]).models.list()]


def test_openai_errors_map_to_exception_classes(gateway):
    with pytest.raises(openai.NotFoundError):
        openai_client(gateway).chat.completions.create(model="llama3.2:404b", messages=[{"role": "user", "content": "x"}])


def test_ollama_chat(gateway):
    r = ollama_client(gateway).chat(model="llama3.2", messages=[{"role": "user", "content": "Why is the sky blue?"}])
    assert r.message.content.startswith("The sky is blue")
    assert r.eval_count == 12


def test_ollama_streaming_chat(gateway):
    parts = list(ollama_client(gateway).chat(model="llama3.2", stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert parts[-1].done and parts[-1].eval_count == 12
    assert "".join(p.message.content for p in parts).startswith("The sky is blue")


def test_ollama_generate_stream(gateway):
    parts = list(ollama_client(gateway).generate(model="llama3.2", prompt="Hi", stream=True))
    assert parts[-1].done


def test_ollama_embed(gateway):
    r = ollama_client(gateway).embed(model="nomic-embed-text", input=["a", "b", "c"])
    assert len(r.embeddings) == 3


def test_ollama_list_and_ps_are_the_teams(gateway):
    names = [m.model for m in ollama_client(gateway).list().models]
    assert sorted(names) == ["llama3.2:latest", "nomic-embed-text:latest"]
    ollama_client(gateway).ps()


def test_ollama_errors_raise_response_error_with_status(gateway):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client(gateway).chat(model="llama3.2:404b", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404


# Keys and policy: the exception classes applications already handle.


def test_openai_wrong_key_is_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError):
        openai_client(gateway, "not-a-key").chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])


def test_openai_disallowed_model_is_permission_denied(gateway):
    with pytest.raises(openai.PermissionDeniedError) as e:
        openai_client(gateway).chat.completions.create(model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "x"}])
    assert "not allowed" in e.value.message


def test_openai_admin_only_for_admin_team(gateway):
    ops = openai_client(gateway, gateway.keys["ops"])
    r = ops.chat.completions.create(model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content


def test_ollama_wrong_key_is_401(gateway):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client(gateway, "not-a-key").chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 401


def test_ollama_disallowed_model_is_403(gateway):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client(gateway).chat(model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 403
    assert "not allowed" in e.value.error


def test_ollama_admin_routes(gateway):
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client(gateway).pull("llama3.2:1b")
    assert e.value.status_code == 403
    ops = ollama_client(gateway, gateway.keys["ops"])
    assert ops.pull("tinyllama").status == "success"
    assert ops.copy("tinyllama", "tinyllama-copy").status == "success"
    assert ops.delete("tinyllama-copy").status == "success"


def test_ollama_key_via_environment(gateway, monkeypatch):
    # ollama-python sends $OLLAMA_API_KEY as a Bearer token when no header is given.
    monkeypatch.setenv("OLLAMA_API_KEY", gateway.keys["research"])
    client = ollama.Client(host=gateway.base, verify=ssl.create_default_context(cafile=gateway.ca))
    assert client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}]).done


def test_openai_rate_limit_is_rate_limit_error(gateway):
    client = openai_client(gateway, gateway.keys["tiny"])
    client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert "requests per minute" in e.value.message


def test_ollama_rate_limit_is_429(gateway):
    client = ollama_client(gateway, gateway.keys["tiny"])
    with pytest.raises(ollama.ResponseError) as e:
        for _ in range(2):
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
