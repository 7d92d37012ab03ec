"""The input processor: every public request validated, rendered and tokenized before it costs
anything (vLLM's `InputProcessor`). The servicer only delegates here.

Long texts and chats are rendered and tokenized on the tokenizer's thread, never on the event
loop; short ones in place (cheaper than the hop). Every limit's message names its setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument, NotFound, quoted
from services.common.grammar import check_schema
from services.common.settings import RouterSettings
from services.common.tensors import from_numpy, to_numpy, validate
from services.common.types import ModelKind, SamplingParams, Span
from services.pb.tessera.v1 import common_pb2, inference_pb2
from services.router.coalescer import INLINE_CHARS, BatchedEncoder
from services.router.frontends import Frontends, ModelFrontend
from services.router.routing import RoutingTable
from services.router.scheduler import MAX_PRIORITY, MIN_PRIORITY

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerateInput:
    """A validated generation: what the engine runs and the output processor needs."""

    model: str
    frontend: ModelFrontend
    prompt_ids: list[int]
    max_new: int
    sampling: SamplingParams
    stop: list[str]
    priority: int


@dataclass(frozen=True)
class ForwardInput:
    """A validated Forward: token ids of a text, or the client's hidden states and mask."""

    frontend: ModelFrontend
    span: Span
    ids: np.ndarray | None  # [1, t] int64 when the input was text
    ids_list: list[int]
    hidden: common_pb2.Tensor | None
    mask: np.ndarray | None  # [b, t] int64, None = all ones
    mask_pb: common_pb2.Tensor | None  # the mask the answer carries back


class InputProcessor:
    """Validation, chat templates and tokenization for every public request."""

    def __init__(
        self,
        settings: RouterSettings,
        frontends: Frontends,
        table: Callable[[], RoutingTable],
    ) -> None:
        self.settings = settings
        self.frontends = frontends
        self._table = table
        # Tokenizing runs here, batched, off the event loop (one thread: batches queue up).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._encoders: dict[ModelFrontend, BatchedEncoder] = {}

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    # -- models ------------------------------------------------------------------------------

    def frontend(self, model: str, kind: ModelKind | None = None) -> ModelFrontend:
        """The model's tokenizer and templates; NOT_FOUND for a model nobody serves."""
        if not model:
            raise InvalidArgument("model is required")
        try:
            frontend = self.frontends.get(model)
        except NotFound:
            if self._table().knows(model):
                raise
            raise NotFound(
                f"unknown model {quoted(model)}; ListModels shows what is served"
            ) from None
        if kind is not None and frontend.kind is not kind:
            what = "generation" if kind is ModelKind.CAUSAL_LM else "embeddings"
            raise InvalidArgument(
                f"model {model!r} is a {frontend.kind.value} model and does not serve {what}"
            )
        return frontend

    def encoder(self, frontend: ModelFrontend) -> BatchedEncoder:
        encoder = self._encoders.get(frontend)
        if encoder is None:
            encoder = self._encoders[frontend] = BatchedEncoder(frontend.encode_texts, self._thread)
        return encoder

    async def _off_loop(self, chars: int, fn: Callable[[], list[int]]) -> list[int]:
        """Short work in place, long work on the tokenizer's thread."""
        if chars <= INLINE_CHARS:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    # -- Generate ----------------------------------------------------------------------------

    async def generate(self, request: inference_pb2.GenerateRequest) -> GenerateInput:
        frontend = self.frontend(request.model, ModelKind.CAUSAL_LM)
        limits = self.settings
        if request.prompt and request.messages:
            raise InvalidArgument("send either prompt or messages, not both")
        sampling = SamplingParams.from_request(request)
        if sampling.json_schema:
            problem = check_schema(sampling.json_schema)
            if problem:
                raise InvalidArgument(f"response_format: the schema is refused: {problem}")
        stop = self._stop(request.stop)
        priority = request.priority if request.HasField("priority") else 0
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {priority}"
            )
        max_new = (
            request.max_new_tokens
            if request.HasField("max_new_tokens")
            else min(limits.default_max_new_tokens, limits.max_new_tokens)
        )
        if not 1 <= max_new <= limits.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {max_new}"
            )
        prompt_ids = await self._prompt_ids(frontend, request)
        if not prompt_ids:
            raise InvalidArgument("prompt encodes to no tokens")
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt is {len(prompt_ids)} tokens, over the "
                f"{limits.max_prompt_tokens} limit (max_prompt_tokens)"
            )
        if len(prompt_ids) + max_new > frontend.max_length:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) is over the "
                f"model's {frontend.max_length} positions"
            )
        return GenerateInput(request.model, frontend, prompt_ids, max_new, sampling, stop, priority)

    async def _prompt_ids(
        self, frontend: ModelFrontend, request: inference_pb2.GenerateRequest
    ) -> list[int]:
        limit = self.settings.max_input_chars
        if not request.messages:
            if not request.prompt.strip():
                raise InvalidArgument("prompt is empty")
            if len(request.prompt) > limit:
                raise InvalidArgument(f"prompt is over {limit} characters (max_input_chars)")
            prompt = request.prompt
            bound = self.settings.max_prompt_tokens
            return await self._off_loop(
                len(prompt), lambda: frontend.encode_prompt(prompt, at_most=bound)
            )
        messages_limit, chars_limit = self.settings.max_chat_messages, self.settings.max_chat_chars
        if len(request.messages) > messages_limit:
            raise InvalidArgument(
                f"{len(request.messages)} chat messages is over the {messages_limit} limit "
                f"(max_chat_messages)"
            )
        chars = 0
        for index, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}, "
                    f"got {quoted(message.role)}"
                )
            if len(message.content) > limit:
                raise InvalidArgument(
                    f"messages[{index}] is over {limit} characters (max_input_chars)"
                )
            chars += len(message.content)
        if chars > chars_limit:
            raise InvalidArgument(
                f"the chat holds {chars} characters, over the {chars_limit} limit (max_chat_chars)"
            )
        if not any(m.content.strip() for m in request.messages):
            raise InvalidArgument("messages are all empty")
        messages = [(m.role, m.content) for m in request.messages]
        return await self._off_loop(chars, lambda: frontend.encode_chat(messages))

    @staticmethod
    def _stop(stop: Sequence[str]) -> list[str]:
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise InvalidArgument(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of "
                f"at most {MAX_STOP_CHARS} characters"
            )
        return list(stop)

    # -- Embed -------------------------------------------------------------------------------

    def texts(self, inputs: Sequence[str]) -> list[str]:
        limits = self.settings
        texts = list(inputs)
        if not texts:
            raise InvalidArgument("inputs is empty")
        if len(texts) > limits.max_embed_inputs:
            raise InvalidArgument(
                f"{len(texts)} inputs is over the {limits.max_embed_inputs} "
                f"limit (max_embed_inputs)"
            )
        for index, text in enumerate(texts):
            if len(text) > limits.max_input_chars:
                raise InvalidArgument(
                    f"inputs[{index}] is over {limits.max_input_chars} characters (max_input_chars)"
                )
            if not text.strip():
                raise InvalidArgument(f"inputs[{index}] is empty")
        return texts

    # -- Forward -----------------------------------------------------------------------------

    async def forward(self, request: inference_pb2.ForwardRequest) -> ForwardInput:
        frontend = self.frontend(request.model)
        num_layers = frontend.spec.num_layers
        end = request.end if request.HasField("end") else num_layers
        if not 0 <= request.start < end <= num_layers:
            raise InvalidArgument(
                f"layers [{request.start}, {end}) must satisfy 0 <= start < end <= {num_layers}"
            )
        span = Span(request.start, end)
        which = request.WhichOneof("input")
        if which == "text":
            job = await self._forward_text(frontend, span, request.text)
        elif which == "hidden_states":
            job = self._forward_hidden(frontend, span, request)
        else:
            raise InvalidArgument("send text or hidden_states")
        if job.ids is not None:
            rows, width = job.ids.shape
        else:
            assert job.hidden is not None
            rows, width = job.hidden.shape[0], job.hidden.shape[1]
        budget = self.settings.max_forward_tokens
        if int(rows) * int(width) > budget:
            raise InvalidArgument(
                f"{rows} x {width} positions is over the {budget} per request (max_forward_tokens)"
            )
        return job

    async def _forward_text(self, frontend: ModelFrontend, span: Span, text: str) -> ForwardInput:
        if span.start != 0:
            raise InvalidArgument("text input needs start = 0; later layers take hidden_states")
        if not text.strip():
            raise InvalidArgument("text is empty")
        if len(text) > self.settings.max_input_chars:
            raise InvalidArgument(
                f"text is over {self.settings.max_input_chars} characters (max_input_chars)"
            )
        ids_list = (await self.encoder(frontend).encode([text]))[0]
        ids = np.asarray([ids_list], dtype=np.int64)
        ones = from_numpy(np.ones_like(ids))
        return ForwardInput(frontend, span, ids, ids_list, None, None, ones)

    @staticmethod
    def _forward_hidden(
        frontend: ModelFrontend, span: Span, request: inference_pb2.ForwardRequest
    ) -> ForwardInput:
        if span.start == 0:
            raise InvalidArgument("hidden_states input needs start > 0; layer 0 takes text")
        floats = ("float32", "float16", "bfloat16")
        shape = validate(request.hidden_states, "hidden_states", ndim=3, dtypes=floats)
        if shape[2] != frontend.spec.hidden_size:
            raise InvalidArgument(
                f"hidden_states: last dimension must be the hidden size "
                f"{frontend.spec.hidden_size}, got {shape[2]}"
            )
        if shape[0] == 0 or shape[1] == 0:
            raise InvalidArgument("hidden_states is empty")
        _check_finite(request.hidden_states)
        mask = mask_pb = None
        if request.HasField("attention_mask"):
            mask_shape = validate(
                request.attention_mask, "attention_mask", ndim=2, dtypes=("int64", "int32", "bool")
            )
            if mask_shape != shape[:2]:
                raise InvalidArgument(
                    f"attention_mask shape {list(mask_shape)} does not "
                    f"match hidden_states {list(shape[:2])}"
                )
            mask = to_numpy(request.attention_mask, "attention_mask").astype(np.int64)
            if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
                raise InvalidArgument("attention_mask values must be 0 or 1")
            mask_pb = request.attention_mask
        return ForwardInput(frontend, span, None, [], request.hidden_states, mask, mask_pb)


def _check_finite(tensor: common_pb2.Tensor) -> None:
    """Hidden states must be finite (the worker checks too, but one bad input must not cost
    the work it would be coalesced with a second try)."""
    if tensor.dtype == "bfloat16":
        words = np.frombuffer(tensor.data, dtype="<u2")
        bad = bool(np.any((words & 0x7F80) == 0x7F80))
    else:
        bad = not bool(np.isfinite(to_numpy(tensor, "hidden_states")).all())
    if bad:
        raise InvalidArgument("hidden_states: contains NaN or Inf")
