"""Condition encoders: class dropout, control features and weight, CEP wrapper, tokenizer, text encoder, padding."""
import math
import zlib

import pytest
import torch

from models.cep import CEP, cross_attention_reference, perturb
from models.conditioning import ClassEmbedder, ControlEmbedder, apply_cep, control_weight, fourier_features
from models.text_encoder import HashTokenizer, TextEncoder, noisy_replicate_padding


def test_class_embedder_drops_labels_to_the_null_class_only_in_training():
    torch.manual_seed(0)
    embedder = ClassEmbedder(10, 8, dropout_prob=0.3)
    labels = torch.arange(10).repeat(200)
    null = embedder.embedding_table.weight[10]
    out = embedder(labels)
    dropped = (out == null).all(1).float().mean()
    assert abs(float(dropped) - 0.3) < 0.04                       # 2000 draws: std ~0.01
    embedder.eval()
    torch.testing.assert_close(embedder(labels), embedder.embedding_table(labels))


def test_fourier_features_and_control_weight():
    values = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    features = fourier_features(values, 8)
    assert features.shape == (2, 16)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(features[1, 8:12], torch.cos(3.0 * freqs))
    torch.testing.assert_close(features[1, 12:], torch.sin(3.0 * freqs))
    t = torch.tensor([0, 333, 666, 999])
    w = control_weight(t, 1000, alpha=2.0)
    torch.testing.assert_close(w, torch.cos(math.pi / 2 * t / 999) ** 2)
    assert w[0] == 1 and w[-1] < 1e-30 and bool((w[1:] < w[:-1]).all())
    embedder = ControlEmbedder(5, 16, alpha=1.0)
    assert embedder(torch.rand(4, 5), t).shape == (4, 16)


def test_apply_cep_is_inactive_in_eval_and_matches_perturb_in_training():
    embedding, q = torch.randn(3, 4, 16), torch.randn(3, 2, 5, 8)
    w_k, w_v = torch.randn(16, 16), torch.randn(16, 16)
    cep = CEP("gaussian", 2.0)
    cep.eval()
    condition = apply_cep(cep, embedding)
    assert condition.gamma == 0 and condition.perturbed() is embedding
    torch.testing.assert_close(condition.attend(q, w_k, w_v), cross_attention_reference(q, embedding, w_k, w_v))
    cep.train()
    condition = apply_cep(cep, embedding)
    expected = perturb(embedding, 2.0, "gaussian", condition.seed, 0)
    torch.testing.assert_close(condition.perturbed(), expected)
    delta = expected - embedding                                   # CEP-G: std gamma / sqrt(d)
    assert abs(float(delta.std()) - 2.0 / 4) < 0.1
    torch.testing.assert_close(condition.attend(q, w_k, w_v), cross_attention_reference(q, expected, w_k, w_v))
    assert apply_cep(cep, embedding).seed != condition.seed        # fresh draw per call


def test_tokenizer_is_deterministic_hashing():
    tokenizer = HashTokenizer(vocab_size=100, max_length=6)
    ids, mask = tokenizer(["A cat, sitting.", "", "one two three four five six"])
    cat = 3 + zlib.crc32(b"cat") % 97
    assert ids[0].tolist()[:3] == [1, 3 + zlib.crc32(b"a") % 97, cat] and ids[0, 6 - 1] == 2
    assert ids[1].tolist() == [1, 2, 0, 0, 0, 0] and mask[1].tolist() == [True, True] + [False] * 4
    assert mask[2].all() and ids[2, -1] == 2                       # truncated to max_length, EOS kept
    torch.testing.assert_close(tokenizer(["A cat, sitting."])[0][0], ids[0])


def test_noisy_replicate_padding():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, True]])
    filled, new_mask = noisy_replicate_padding(tokens, mask)
    assert new_mask.all()
    torch.testing.assert_close(filled[0], tokens[0, [0, 1, 0, 1, 0]])
    torch.testing.assert_close(filled[1], tokens[1])
    noisy, _ = noisy_replicate_padding(tokens, mask, 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy[:, :2], tokens[:, :2])        # real tokens untouched
    torch.testing.assert_close(noisy[1], tokens[1])
    assert 0.2 < float((noisy[0, 2:] - filled[0, 2:]).std()) < 1.0


def test_text_encoder_shapes_padding_modes_and_local_pretrained(tmp_path):
    torch.manual_seed(0)
    texts = ["a red square on the left", "blue"]
    zero = TextEncoder(vocab_size=64, max_length=8, width=16, depth=1, num_heads=2)
    context, mask = zero.encode(texts)
    assert context.shape == (2, 8, 16) and mask[1].tolist() == [True] * 3 + [False] * 5
    assert context[1, 3:].abs().max() == 0
    zero.padding = "noisy-replicate"
    zero.eval()
    replicated, full_mask = zero.encode(texts)
    assert full_mask.all()
    torch.testing.assert_close(replicated[1, 3:6], context[1, :3])   # eval: copies without noise
    zero.train()
    assert not torch.allclose(zero.encode(texts)[0][1, 3:6], context[1, :3])
    zero.padding = "zero"
    zero.save_pretrained(tmp_path / "enc")
    loaded = TextEncoder.from_pretrained(tmp_path / "enc")
    torch.testing.assert_close(loaded.encode(texts)[0], context)


@pytest.mark.parametrize("call,name", [
    (lambda: ClassEmbedder(0, 8), "num_classes"),
    (lambda: ClassEmbedder(10, 8)(torch.tensor([11])), "y"),
    (lambda: ClassEmbedder(10, 8)(torch.tensor([1.0])), "y"),
    (lambda: ControlEmbedder(5, 8)(torch.rand(2, 4), torch.tensor([1, 2])), "control"),
    (lambda: ControlEmbedder(5, 8, alpha=0.0), "control_alpha"),
    (lambda: HashTokenizer(vocab_size=2), "vocab_size"),
    (lambda: HashTokenizer()("a string"), "texts"),
    (lambda: TextEncoder(padding="mean"), "padding"),
    (lambda: noisy_replicate_padding(torch.zeros(2, 3, 4), torch.ones(2, 3)), "mask"),
    (lambda: TextEncoder.from_pretrained("/nonexistent"), "directory"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call()
