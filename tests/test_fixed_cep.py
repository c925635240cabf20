"""Fixed CEP (paper 1 Table 7): one CEP draw per chosen training item, the same at every step."""
import pytest
import torch

from models.conditioning import ClassEmbedder
from test_train import TINY, single_thread  # noqa: F401 (autouse fixture)
from training.regularizers import FixedCEP
from training.train import main


def hooked(fraction=0.25, num_items=40, seed=3):
    torch.manual_seed(0)
    embedder = ClassEmbedder(4, 8, dropout_prob=0.0)
    fixed = FixedCEP(num_items, fraction, gamma=1.0, mode="uniform", seed=seed)
    fixed.attach(embedder)
    return embedder, fixed


def embed(embedder, fixed, indices, labels):
    with fixed.batch(torch.tensor(indices)):
        return embedder(torch.tensor(labels))


def test_subset_size_and_seed():
    _, fixed = hooked(0.25, 40)
    assert int(fixed.fixed.sum()) == 10
    assert torch.equal(hooked(0.25, 40)[1].fixed, fixed.fixed)
    assert not torch.equal(hooked(0.25, 40, seed=4)[1].fixed, fixed.fixed)


def test_noise_is_fixed_per_item_and_absent_elsewhere():
    embedder, fixed = hooked()
    table = embedder.embedding_table.weight
    chosen = torch.nonzero(fixed.fixed).flatten().tolist()
    other = torch.nonzero(~fixed.fixed).flatten().tolist()
    indices = [chosen[0], other[0], chosen[1], chosen[2]]
    labels = [1, 2, 3, 4]                                             # 4 = the null (CFG) class
    first = embed(embedder, fixed, indices, labels)
    # Another step: the items come in another order and with other labels; item chosen[0]'s delta is unchanged.
    second = embed(embedder, fixed, [chosen[1], chosen[0]], [0, 3])
    delta = first[0] - table[1]
    assert delta.abs().max() > 0 and delta.abs().max() <= 1.0 / 8 ** 0.5   # U(-gamma/sqrt(d), gamma/sqrt(d))
    assert torch.allclose(second[1] - table[3], delta)
    assert not torch.allclose(first[2] - table[3], delta)             # items get different draws
    assert torch.equal(first[1], table[2])                            # not in the subset: no noise
    assert torch.equal(first[3], table[4])                            # null rows: no noise
    assert torch.equal(embedder.eval()(torch.tensor([1])), table[1:2])


def test_forward_outside_a_batch_block_and_bad_arguments():
    embedder, _ = hooked()
    with pytest.raises(RuntimeError, match="fixed_cep.batch"):
        embedder(torch.tensor([0]))
    with pytest.raises(ValueError, match="cep_fixed_fraction"):
        FixedCEP(10, 1.5, 1.0, "uniform", 0)
    with pytest.raises(ValueError, match="--cep-gamma"):
        FixedCEP(10, 0.5, 0.0, "uniform", 0)


def test_training_with_fixed_cep(tmp_path):
    main([*TINY, "--run-dir", str(tmp_path / "run"), "--total-images", "32", "--cep-fixed-fraction", "0.5"])
    assert (tmp_path / "run" / "ema.safetensors").is_file()
    with pytest.raises(SystemExit):   # a fixed draw needs a CEP law
        main([*TINY, "--run-dir", str(tmp_path / "bad"), "--cep", "none", "--cep-fixed-fraction", "0.5"])
