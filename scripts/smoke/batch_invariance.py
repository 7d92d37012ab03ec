"""One MiniLM text alone vs beside 15 texts of its length in one pass, per precision (StageModel,
the worker's own forward); and each precision's worst cosine to sentence-transformers' float32."""
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import numpy as np, torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer
from services.common.repository import model_spec
from services.common.types import Span
from services.worker.stage import StageModel
repo = Path(str(REPO / "model-repository"))
spec = model_spec(repo, "all-minilm-l6-v2")
tok = AutoTokenizer.from_pretrained(spec.path)
words = "the quick brown fox jumps over a lazy dog while cats sleep in warm sun and birds sing".split()
rng = np.random.default_rng(3)
texts = [" ".join(rng.choice(words, 12)) for _ in range(16)]
enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=16)
ids, mask = enc.input_ids, enc.attention_mask
ref = SentenceTransformer(str(spec.path), device="cpu").encode(texts, normalize_embeddings=True)
def pool(h, m):
    v = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    return torch.nn.functional.normalize(v, dim=-1)
torch.set_num_threads(2)
for precision in ("float32", "bfloat16", "int8"):
    stage = StageModel(spec, Span(0, spec.num_layers), precision=precision)
    with torch.inference_mode():
        alone = pool(stage.forward(input_ids=ids[:1], attention_mask=mask[:1]), mask[:1])
        together = pool(stage.forward(input_ids=ids, attention_mask=mask), mask)
    diff = float((alone[0] - together[0]).abs().max())
    cos = float(np.min(np.sum(together.numpy() * ref, axis=1)))
    print(f"{precision:9s} alone vs beside 15: max |diff| {diff:.2e}; worst cosine to sentence-transformers float32 {cos:.5f}")
