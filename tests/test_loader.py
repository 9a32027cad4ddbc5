import pytest

from nbgpt.loader import DataLoader
from nbgpt.shards import DataError, TokenStore, prepare


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = root / "corpus"
    text.mkdir()
    for i in range(30):
        (text / f"{i:02d}.txt").write_text(" ".join(f"item {i * 1000 + j}." for j in range(20 + 3 * i)))
    prepare(str(text), "gpt2", root / "ds", shard_tokens=1000, val_fraction=0.1)
    return root / "ds"


def test_batches_are_next_token_pairs(dataset):
    loader = DataLoader(dataset, "train", batch_size=4, seq_len=16)
    store = TokenStore(dataset)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert x[0].tolist() == store.read(0, 16).tolist()
    assert x[1].tolist() == store.read(16, 16).tolist()  # windows cross shard boundaries seamlessly


def test_ranks_cover_disjoint_data_equal_to_one_process(dataset):
    single = DataLoader(dataset, "train", batch_size=4, seq_len=16)
    ranks = [DataLoader(dataset, "train", batch_size=2, seq_len=16, rank=r, world_size=2) for r in range(2)]
    seen = set()
    for _ in range(single.steps_per_epoch):
        xs = [loader.next_batch()[0] for loader in ranks]
        rows = {tuple(row.tolist()) for x in xs for row in x}
        assert not seen & rows
        seen |= rows
        assert {tuple(r.tolist()) for r in single.next_batch()[0]} == rows


@pytest.mark.parametrize("shuffle,align", [(False, False), (True, False), (True, True)])
def test_resume_gives_exactly_the_next_batch(dataset, shuffle, align):
    kwargs = dict(batch_size=3, seq_len=16, shuffle=shuffle, seed=5, align_documents=align)
    straight = DataLoader(dataset, "train", **kwargs)
    expected = [straight.next_batch()[0] for _ in range(straight.steps_per_epoch + 7)]  # crosses an epoch
    for k in (1, 5, straight.steps_per_epoch, straight.steps_per_epoch + 2):
        first = DataLoader(dataset, "train", **kwargs)
        for _ in range(k):
            first.next_batch()
        resumed = DataLoader(dataset, "train", **kwargs)
        resumed.load_state_dict(first.state_dict())
        assert resumed.next_batch()[0].equal(expected[k])


def test_shuffle_changes_order_per_epoch_and_aligned_windows_start_docs(dataset):
    loader = DataLoader(dataset, "train", batch_size=2, seq_len=16, shuffle=True, seed=1, align_documents=True)
    epoch0 = [loader.next_batch()[0] for _ in range(loader.steps_per_epoch)]
    epoch1 = [loader.next_batch()[0] for _ in range(loader.steps_per_epoch)]
    assert all((x[:, 0] == 50256).all() for x in epoch0)
    assert any(not a.equal(b) for a, b in zip(epoch0, epoch1))
    for epoch in (epoch0, epoch1):  # no window twice within an epoch
        rows = [tuple(r.tolist()) for x in epoch for r in x]
        assert len(set(rows)) == len(rows)


def test_validation_is_deterministic(dataset):
    val = DataLoader(dataset, "val", batch_size=2, seq_len=8)
    first = [val.next_batch()[0] for _ in range(3)]
    val.reset()
    assert all(a.equal(val.next_batch()[0]) for a in first)
    start, _ = TokenStore(dataset).split_range("val")
    assert first[0][0].tolist() == TokenStore(dataset).read(start, 8).tolist()


def test_loader_errors(dataset):
    with pytest.raises(DataError, match="fewer than one batch of 64 x 1"):
        DataLoader(dataset, "val", batch_size=64, seq_len=64)
    with pytest.raises(DataError, match="unknown split 'test'"):
        DataLoader(dataset, "test", batch_size=1, seq_len=8)
    loader = DataLoader(dataset, "train", batch_size=2, seq_len=8)
    other = DataLoader(dataset, "train", batch_size=2, seq_len=8, rank=0, world_size=2)
    with pytest.raises(DataError, match="world_size=2 but this loader has world_size=1"):
        loader.load_state_dict(other.state_dict())
