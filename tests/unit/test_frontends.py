"""The router's frontend (tokenizers + Jinja, no transformers) against transformers' AutoTokenizer.

The reference is transformers itself: token ids of prompts, chat templates rendered by
`apply_chat_template(..., add_generation_prompt=True, tokenize=False)` and then encoded, padded and
truncated batches, decoded text. Both real models and the four tiny ones.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.common.errors import InvalidArgument, NotFound
from services.common.repository import model_spec
from services.router.chat import compile_template
from services.router.frontends import Frontends, ModelFrontend
from tests.integration.test_real_models import CHATS, LONG_TEXT, TEXTS
from tests.integration.test_real_models import PROMPTS as REAL_PROMPTS
from tests.integration.test_tiny_mesh import PROMPTS as TINY_PROMPTS

ROOT = Path(__file__).resolve().parents[2]
REAL = ("smollm2-135m-instruct", "all-minilm-l6-v2")
TINY = ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-roberta")
MODELS = [pytest.param(m, marks=pytest.mark.slow) for m in REAL] + list(TINY)

TINY_LONG = " ".join(["the cat sat on the mat ."] * 50)  # 350 tokens: over every tiny limit
VERY_LONG = " ".join([LONG_TEXT] * 12 + [TINY_LONG])  # over SmolLM2's 8192 too
PROMPTS = [
    *REAL_PROMPTS,
    *TINY_PROMPTS,
    *TEXTS,
    TINY_LONG,
    "",
    "   ",
    "  leading, trailing and  double  spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Emoji: 🙂👍🏽 👩‍👩‍👧‍👦 🇫🇷 ✨",
    "naïve café, Ünïcödé, combining e\u0301, ﬁ ligature, ½, ²",
    "日本語の文章と中文句子, 한국어 문장",
    "مرحبا بالعالم and עברית",
    "special tokens in text: <|im_start|> <|im_end|> <|endoftext|> [CLS] [SEP] [PAD] <s> </s>",
    "don't, I'm, you're, it's, we've . , ? ! ' spaced ' punctuation",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "the cat sat on the mat and the dog sat on the cat",
]
MORE_CHATS = [
    [("user", "hello")],
    [("system", "Be terse."), ("user", "What is 2 + 2? 🙂"), ("assistant", "4."), ("user", "Why?")],
    [("user", "the cat"), ("assistant", "sat on the mat"), ("user", "and the dog ?")],
    [("system", "日本語で答えて"), ("user", "¿Qué tal? 日本語 👩‍👩‍👧‍👦")],
    [("user", "{{ bos_token }} {% if true %}not a template{% endif %} <|im_end|> </s>")],
    [("system", ""), ("user", "  spaced  ")],
    [("user", LONG_TEXT)],
]
ALL_CHATS = [*CHATS, *MORE_CHATS]


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[ModelFrontend, PreTrainedTokenizerBase]]:
    return {}


@pytest.fixture
def pair(
    request: pytest.FixtureRequest,
    loaded: dict[str, tuple[ModelFrontend, PreTrainedTokenizerBase]],
) -> tuple[ModelFrontend, PreTrainedTokenizerBase]:
    """(our frontend, transformers' AutoTokenizer) for the model in request.param."""
    model = request.param
    if model not in loaded:
        repo: Path = request.getfixturevalue("real_repo" if model in REAL else "tiny_repo")
        loaded[model] = (
            ModelFrontend(model_spec(repo, model)),
            AutoTokenizer.from_pretrained(repo / model),
        )
    return loaded[model]


each_model = pytest.mark.parametrize("pair", MODELS, indirect=True)


def _reference_pad_id(reference: PreTrainedTokenizerBase) -> int:
    pad = reference.pad_token_id
    return int(reference.eos_token_id if pad is None else pad)


@each_model
def test_backend_tokenizer_is_transformers_one(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    ours = json.loads(frontend.tokenizer.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    # Truncation and padding are per-call settings in transformers (it resets them on every
    # call); ours are off and applied per call too.
    for key in ("truncation", "padding"):
        ours.pop(key)
        theirs.pop(key)
    assert ours == theirs


@each_model
def test_prompt_ids_are_transformers_ids(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    for prompt in PROMPTS:
        assert frontend.encode_prompt(prompt) == reference(prompt)["input_ids"], prompt


@each_model
def test_batches_are_truncated_and_padded_as_transformers_does(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    limit = frontend.max_length
    assert len(reference(VERY_LONG)["input_ids"]) > limit  # really truncates
    for texts in (PROMPTS, TEXTS, [VERY_LONG], ["hello"], [*PROMPTS[::-1], VERY_LONG]):
        want = reference(texts, padding=True, truncation=True, max_length=limit)
        ids, masks = frontend.encode_batch(texts)
        assert ids == want["input_ids"]
        assert masks == want["attention_mask"]
        unpadded = reference(texts, truncation=True, max_length=limit)["input_ids"]
        assert frontend.encode_texts(texts) == unpadded
    assert [len(row) for row in frontend.encode_texts([VERY_LONG, "hello"])][0] == limit


@each_model
def test_special_ids_are_transformers_ones(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    assert frontend.pad_id == _reference_pad_id(reference)
    if reference.eos_token_id is not None:
        assert reference.eos_token_id in frontend.eos_token_ids
    assert frontend.special_tokens.items() >= reference.special_tokens_map.items()


@each_model
def test_decoding_is_transformers_decoding(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    rows = [frontend.encode_prompt(p) for p in PROMPTS]
    rows += frontend.encode_batch(PROMPTS)[0]  # with special and pad tokens
    rng = random.Random(0)
    size = frontend.tokenizer.get_vocab_size(with_added_tokens=True)
    rows += [[rng.randrange(size) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    # The router decodes growing windows of a stream (TextAssembler): cut rows at every length.
    rows += [row[:cut] for row in rows[:20] for cut in range(len(row))]
    for row in rows:
        assert frontend.decode(row) == reference.decode(row, skip_special_tokens=True), row


@pytest.mark.parametrize(
    "pair",
    [pytest.param("smollm2-135m-instruct", marks=pytest.mark.slow), "tiny-llama", "tiny-gpt2"],
    indirect=True,
)
def test_chats_are_rendered_and_encoded_as_transformers_does(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    assert frontend.chat_template is not None
    for chat in ALL_CHATS:
        text = reference.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True, tokenize=False
        )
        assert frontend.chat_template.render(chat) == text
        assert frontend.encode_chat(chat) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "pair",
    [pytest.param("all-minilm-l6-v2", marks=pytest.mark.slow), "tiny-bert", "tiny-roberta"],
    indirect=True,
)
def test_a_model_without_chat_template_refuses_messages(
    pair: tuple[ModelFrontend, PreTrainedTokenizerBase],
) -> None:
    frontend, reference = pair
    assert reference.chat_template is None
    with pytest.raises(InvalidArgument, match="no chat template"):
        frontend.encode_chat([("user", "hello")])


def _copy_tokenizer(tiny_repo: Path, model: str, out: Path) -> Path:
    """The files a frontend reads (no weights), to edit one of them."""
    out.mkdir(parents=True)
    for file in (tiny_repo / model).iterdir():
        if file.suffix in (".json", ".jinja"):
            shutil.copy(file, out / file.name)
    return out


# Exercises what transformers' environment adds: trim/lstrip blocks, loop controls, namespace,
# dict, tojson without HTML escaping, strftime_now, raise_exception, {% generation %}, tokens.
ENVIRONMENT_TEMPLATE = """
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' and not loop.first %}
        {{ raise_exception('a system message must come first') }}
    {% endif %}
    {% if m['content'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}
    {% else %}
<s>{{ m['role'] }} {{ m | tojson }} {{ dict(n=ns.count, pad=pad_token) | tojson(indent=1) }}
    {% endif %}
    {% if loop.index > 6 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<s>assistant {{ strftime_now('%Y') }}{% endif %}
"""


def test_template_environment_is_transformers_environment(tiny_repo: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(tiny_repo, "tiny-llama", tmp_path / "tiny-env")
    (folder / "chat_template.jinja").write_text(ENVIRONMENT_TEMPLATE)
    frontend = ModelFrontend(model_spec(tmp_path, "tiny-env"))
    reference = AutoTokenizer.from_pretrained(folder)
    chats = [
        *ALL_CHATS,
        [("user", "<b>&amp; 'quotes' \"double\" é 🙂</b>"), ("assistant", "skip"), ("user", "x")],
        [("user", str(i)) for i in range(10)],
    ]
    for chat in chats:
        text = reference.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat], add_generation_prompt=True, tokenize=False
        )
        assert frontend.chat_template is not None
        assert frontend.chat_template.render(chat) == text
        assert frontend.encode_chat(chat) == reference(text, add_special_tokens=False)["input_ids"]
    refused = [("user", "hello"), ("system", "late")]
    with pytest.raises(jinja2.TemplateError, match="must come first"):
        reference.apply_chat_template(
            [{"role": r, "content": c} for r, c in refused], add_generation_prompt=True
        )
    with pytest.raises(InvalidArgument, match="must come first"):
        frontend.encode_chat(refused)


def test_template_in_tokenizer_config_and_the_jinja_file_first(
    tiny_repo: Path, tmp_path: Path
) -> None:
    folder = _copy_tokenizer(tiny_repo, "tiny-llama", tmp_path / "tiny-config")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat = [("user", "the cat"), ("assistant", "sat")]
    messages = [{"role": r, "content": c} for r, c in chat]
    frontend = ModelFrontend(model_spec(tmp_path, "tiny-config"))
    reference = AutoTokenizer.from_pretrained(folder)
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert want == "[the cat][sat]</s>"
    assert frontend.chat_template is not None and frontend.chat_template.render(chat) == want
    (folder / "chat_template.jinja").write_text("{{ messages | length }} messages")
    frontend = ModelFrontend(model_spec(tmp_path, "tiny-config"))
    reference = AutoTokenizer.from_pretrained(folder)
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert want == "2 messages"
    assert frontend.chat_template is not None and frontend.chat_template.render(chat) == want


def test_special_tokens_missing_from_tokenizer_json_are_added(
    tiny_repo: Path, tmp_path: Path
) -> None:
    folder = _copy_tokenizer(tiny_repo, "tiny-llama", tmp_path / "tiny-extra")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["mask_token"] = "<mask>"
    config["extra_special_tokens"] = ["<tool>", "<image>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    frontend = ModelFrontend(model_spec(tmp_path, "tiny-extra"))
    reference = AutoTokenizer.from_pretrained(folder)
    text = "the cat <tool> sat <image> on <mask> the mat"
    assert frontend.encode_prompt(text) == reference(text)["input_ids"]
    ids = frontend.encode_prompt(text)
    assert len(ids) == 9  # each added token is one token
    assert frontend.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert frontend.special_tokens["mask_token"] == "<mask>"


def test_template_is_compiled_once(tiny_repo: Path) -> None:
    frontend = ModelFrontend(model_spec(tiny_repo, "tiny-llama"))
    assert frontend.chat_template is not None
    compiled = frontend.chat_template.template
    misses = compile_template.cache_info().misses
    for chat in ALL_CHATS:
        frontend.encode_chat(chat)
    again = ModelFrontend(model_spec(tiny_repo, "tiny-llama"))
    assert again.chat_template is not None and again.chat_template.template is compiled
    assert compile_template.cache_info().misses == misses


def test_unknown_models_and_folders_without_a_tokenizer_are_not_found(
    tiny_repo: Path, tmp_path: Path
) -> None:
    frontends = Frontends(tiny_repo)
    assert frontends.get("tiny-llama") is frontends.get("tiny-llama")
    for name in ("no-such-model", "../tiny-llama", ""):
        with pytest.raises(NotFound):
            frontends.get(name)
    folder = _copy_tokenizer(tiny_repo, "tiny-bert", tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(NotFound):
        Frontends(tmp_path).get("no-tokenizer")


def test_the_router_modules_need_neither_torch_nor_transformers() -> None:
    """The fast-tier guard; tests/integration/test_router_imports.py watches a serving router."""
    code = (
        "import sys, services.cli, services.router.main;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _edited(source: Path, name: str, out: Path, **settings: object) -> Path:
    """A copy of a model's tokenizer files under out/name with tokenizer_config.json edited."""
    folder = _copy_tokenizer(source.parent, source.name, out / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(settings)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_sides_of_padding_and_truncation_follow_the_config(
    model: str, tiny_repo: Path, tmp_path: Path
) -> None:
    folder = _edited(
        tiny_repo / model, "sides", tmp_path, padding_side="left", truncation_side="left"
    )
    frontend = ModelFrontend(model_spec(tmp_path, "sides"))
    reference = AutoTokenizer.from_pretrained(folder)
    texts = [*TINY_PROMPTS, TINY_LONG, "hello"]
    want = reference(texts, padding=True, truncation=True, max_length=frontend.max_length)
    assert frontend.encode_batch(texts) == (want["input_ids"], want["attention_mask"])
    unpadded = reference(texts, truncation=True, max_length=frontend.max_length)["input_ids"]
    assert frontend.encode_texts(texts) == unpadded
    assert frontend.encode_batch(texts)[1][0][0] == 0  # really padded on the left


@pytest.mark.parametrize(
    "model", ["tiny-bert", "tiny-llama", pytest.param("smollm2", marks=pytest.mark.slow)]
)
def test_clean_up_tokenization_spaces_as_transformers_applies_it(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if model == "smollm2":  # BPE: transformers ignores the setting (it would corrupt the text)
        source = request.getfixturevalue("real_repo") / "smollm2-135m-instruct"
    else:
        source = request.getfixturevalue("tiny_repo") / model
    folder = _edited(source, "clean", tmp_path, clean_up_tokenization_spaces=True)
    frontend = ModelFrontend(model_spec(tmp_path, "clean"))
    reference = AutoTokenizer.from_pretrained(folder)
    for text in ["the cat , sat on the mat . what is it ?", *PROMPTS]:
        ids = frontend.encode_prompt(text)
        assert frontend.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    if model != "smollm2":
        assert frontend.decode(frontend.encode_prompt("the cat , sat .")) == "the cat, sat."
