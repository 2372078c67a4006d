"""LoRA adapters over the OpenAI-compatible server, in this process on a tiny Llama with two
PEFT adapters: /v1/models lists them under their base model, ``"model": <adapter>`` gives the
tokens of ``LLM.generate(..., lora_request=...)``, unknown models get vLLM's 404, adapters
load and unload at run time with KVPAGE_ALLOW_RUNTIME_LORA_UPDATING (and only then); the
``kvpage serve`` LoRA options."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from kvpage_runtime import LLM, AsyncLLM, EngineConfig, LoRARequest, SamplingParams
from kvpage_runtime.cli import LoRAModulePath, build_parser, main
from kvpage_runtime.server import ServerSettings, build_app
from kvpage_runtime.server.state import RUNTIME_LORA_UPDATING_ENV
from model_helpers import TINY, save_tiny_model, word_tokenizer
from test_lora import make_adapter  # skips this module too where peft is not installed

from .live_server import API_KEY, free_port, serving_in_thread

BASE = "tiny-base"
NEW_TOKENS = 8
PROMPT = [5, 37, 42, 9, 300, 64]  # words without t0, t1, t2 (special) in them
ENGINE = dict(dtype="float32", device="cpu", max_model_len=128, kv_cache_memory=16 << 20,
              enable_lora=True, max_loras=2)
ADAPTERS = {  # name -> LoraConfig arguments
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "chat": dict(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj", "up_proj"]),
}
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama (word tokenizer with a chat template) and its two adapters' folders."""
    root = tmp_path_factory.mktemp("lora-server")
    folder = save_tiny_model(transformers.LlamaConfig(**TINY), root / "base")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    paths = {name: make_adapter(base, root / name, seed=i, **cfg)
             for i, (name, cfg) in enumerate(ADAPTERS.items(), start=1)}
    return folder, paths


@pytest.fixture(scope="module")
def expected(models) -> dict[str | None, list[int]]:
    """``LLM.generate`` greedy tokens of PROMPT for the base model (None) and each adapter."""
    folder, paths = models
    llm = LLM(str(folder), **ENGINE)
    loras = [None, *(LoRARequest(n, i, str(p)) for i, (n, p) in enumerate(paths.items(), 1))]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[PROMPT] * len(loras), sampling_params=params,
                        use_tqdm=False, lora_request=loras)
    return {None if lora is None else lora.lora_name: list(out.outputs[0].token_ids)
            for lora, out in zip(loras, outs, strict=True)}


@pytest.fixture(scope="module")
def url(models) -> Iterator[str]:
    """A server with an API key, runtime LoRA updating on, and both adapters registered as
    ``kvpage serve --lora-modules`` registers them."""
    from kvpage_runtime.cli import _load_lora_modules

    folder, paths = models
    engine = AsyncLLM(EngineConfig(str(folder), served_model_name=BASE, **ENGINE))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUNTIME_LORA_UPDATING_ENV, "true")
        app = build_app(engine, ServerSettings(api_key=API_KEY))
    modules = [LoRAModulePath(name, str(path)) for name, path in paths.items()]
    asyncio.run(_load_lora_modules(app.state.server, modules))
    with serving_in_thread(app) as base_url:
        yield base_url


@pytest.fixture
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as client:
        yield client


def _complete(http: httpx.Client, model: str | None, **body) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **body}
    return http.post("/v1/completions", json={"model": model, **body})


def _tokens(response: httpx.Response, tokenizer) -> list[int]:
    assert response.status_code == 200, response.text
    return tokenizer.convert_tokens_to_ids(response.json()["choices"][0]["logprobs"]["tokens"])


# ---- the server --------------------------------------------------------------------------


def test_models_lists_the_adapters_under_the_base_model(http, models):
    _, paths = models
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(cards) == [BASE, "sql", "chat"]
    assert cards[BASE]["parent"] is None
    for name, path in paths.items():
        assert cards[name]["root"] == str(path) and cards[name]["parent"] == BASE


def test_completions_with_an_adapter_equal_llm_generate(url, expected):
    """The base model and both adapters at once (one batch can hold them all)."""
    tokenizer = word_tokenizer()

    async def run() -> dict[str | None, list[int]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY,
                                      max_retries=0) as client:
            names = [BASE, "sql", "chat"]
            outs = await asyncio.gather(*(
                client.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                          temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True})
                for name in names))
        assert [out.model for out in outs] == names
        return {None if name == BASE else name:
                tokenizer.convert_tokens_to_ids(out.choices[0].logprobs.tokens)
                for name, out in zip(names, outs, strict=True)}

    got = asyncio.run(run())
    assert got == expected
    assert expected["sql"] != expected[None] and expected["chat"] != expected[None]


def test_chat_with_an_adapter(http, expected):
    """The template renders the message as the prompt's words: the adapter's tokens again."""
    content = " ".join(f"t{t}" for t in PROMPT)
    r = http.post("/v1/chat/completions", json={
        "model": "sql", "messages": [{"role": "user", "content": content}],
        "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": True})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "sql"
    tokens = [entry["token"] for entry in r.json()["choices"][0]["logprobs"]["content"]]
    assert word_tokenizer().convert_tokens_to_ids(tokens) == expected["sql"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_vllms_404(http, route):
    body = {"model": "nope", "prompt": PROMPT, "messages": [{"role": "user", "content": "t5"}]}
    r = http.post(route, json=body)
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model `nope` does not exist.",
                                  "type": "NotFoundError", "param": "model", "code": 404}}


def test_load_and_unload_at_run_time(http, models, expected):
    _, paths = models
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": str(paths["sql"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql2' added successfully."
    card = next(c for c in http.get("/v1/models").json()["data"] if c["id"] == "sql2")
    assert card["parent"] == BASE and card["root"] == str(paths["sql"])
    assert _tokens(_complete(http, "sql2"), word_tokenizer()) == expected["sql"]

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": "/x"})
    assert again.status_code == 400 and "'sql2' has already been loaded" in again.text
    base = http.post("/v1/load_lora_adapter", json={"lora_name": BASE, "lora_path": "/x"})
    assert base.status_code == 400 and "the base model's name" in base.text

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql2"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql2' removed successfully."
    assert "sql2" not in {c["id"] for c in http.get("/v1/models").json()["data"]}
    assert _complete(http, "sql2").status_code == 404
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql2"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"


def test_loading_a_bad_adapter_is_400(http, tmp_path):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400
    assert "adapter 'bad'" in r.text and "adapter_config.json" in r.text
    assert "bad" not in {c["id"] for c in http.get("/v1/models").json()["data"]}


def test_lora_routes_need_the_api_key(url):
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"})
    assert r.status_code == 401


def test_lora_routes_are_absent_without_the_environment_variable(models, monkeypatch):
    """Without KVPAGE_ALLOW_RUNTIME_LORA_UPDATING the routes 404; with LoRA disabled a load
    is a 400 that names --enable-lora."""
    folder, paths = models
    engine = AsyncLLM(EngineConfig(str(folder), **{**ENGINE, "enable_lora": False}))
    monkeypatch.delenv(RUNTIME_LORA_UPDATING_ENV, raising=False)
    hidden = build_app(engine, ServerSettings(shutdown_engine=False))
    monkeypatch.setenv(RUNTIME_LORA_UPDATING_ENV, "1")
    routed = build_app(engine, ServerSettings(shutdown_engine=False))
    body = {"lora_name": "sql", "lora_path": str(paths["sql"])}

    async def post(app, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body)

    async def run() -> list[httpx.Response]:
        try:
            return [await post(hidden, "/v1/load_lora_adapter"),
                    await post(hidden, "/v1/unload_lora_adapter"),
                    await post(routed, "/v1/load_lora_adapter")]
        finally:
            await engine.shutdown()

    load, unload, disabled = asyncio.run(run())
    assert load.status_code == unload.status_code == 404
    assert disabled.status_code == 400 and "--enable-lora" in disabled.json()["error"]["message"]


# ---- the command line ----------------------------------------------------------------------


def test_lora_options_parse_as_vllms():
    args = build_parser().parse_args(["serve", "--enable-lora", "--lora-modules", "a=/p", "b=/q"])
    assert args.enable_lora
    assert args.lora_modules == [LoRAModulePath("a", "/p"), LoRAModulePath("b", "/q")]
    assert (args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (1, 16, None)
    args = build_parser().parse_args([
        "serve", "--lora-modules", '{"name": "a", "path": "/p", "base_model_name": "m"}',
        "c=/x=y", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8"])
    assert args.lora_modules == [LoRAModulePath("a", "/p", "m"), LoRAModulePath("c", "/x=y")]
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        False, 4, 64, 8)


@pytest.mark.parametrize("module", ["a", "=/p", "a=", '{"name": "a"}', '{"name": "a", "path": 1}',
                                    '{"name": "a", "path": "/p", "rank": 8}', "{not json"])
def test_bad_lora_modules_are_refused(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--enable-lora", "--lora-modules", module])
    assert exit_.value.code == 2 and "--lora-modules" in capsys.readouterr().err


def test_lora_modules_need_enable_lora(capsys):
    assert main(["serve", "--lora-modules", "a=/p"]) == 1
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err


def test_a_bad_startup_adapter_ends_the_server_before_it_serves(models, tmp_path, capsys):
    folder, paths = models
    code = main(["serve", str(folder), "--port", str(free_port()), "--device", "cpu",
                 "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--enable-lora",
                 "--lora-modules", f"sql={paths['sql']}", f"broken={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot load LoRA adapter 'broken'" in err and "adapter_config.json" in err, err
