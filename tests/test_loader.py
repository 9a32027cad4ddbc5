import pytest
import torch

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
    with pytest.raises(DataError, match="a step of 6 windows does not split into batches of 4 x 1"):
        DataLoader(dataset, "train", batch_size=4, seq_len=8, step_sequences=6)


STEP = 12  # windows per optimizer step; the split's 431 windows of 16 hold 35 steps and 11 windows more


def layout(dataset, batch_size, world_size, **kwargs):
    return [DataLoader(dataset, "train", batch_size=batch_size, seq_len=16, rank=r, world_size=world_size,
                       step_sequences=STEP, **kwargs) for r in range(world_size)]


def optimizer_steps(loaders, count):
    """What `count` optimizer steps read, each a (STEP, T) tensor in trainer order: micro-step m, then rank r."""
    micro_steps = STEP // (loaders[0].B * len(loaders))
    return [torch.cat([loader.next_batch()[0] for _ in range(micro_steps) for loader in loaders])
            for _ in range(count)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_step_reads_the_same_windows_whatever_the_layout(dataset, shuffle):
    reference = optimizer_steps(layout(dataset, STEP, 1, shuffle=shuffle, seed=3), 40)  # crosses an epoch
    assert layout(dataset, STEP, 1)[0].epoch_sequences == 35 * STEP
    for batch_size, world_size in ((6, 2), (3, 2), (2, 3), (1, 4), (4, 1)):
        steps = optimizer_steps(layout(dataset, batch_size, world_size, shuffle=shuffle, seed=3), 40)
        assert all(a.equal(b) for a, b in zip(steps, reference)), (batch_size, world_size)
    epoch0 = {tuple(row.tolist()) for x in reference[:35] for row in x}
    assert len(epoch0) == 35 * STEP and reference[35].equal(reference[0]) != shuffle  # a new epoch at step 35


@pytest.mark.parametrize("stop", [5, 35, 37])
def test_resume_with_another_layout_reads_what_the_run_would_have_read_next(dataset, stop):
    reference = optimizer_steps(layout(dataset, 6, 2, shuffle=True, seed=3), 42)
    before = layout(dataset, 6, 2, shuffle=True, seed=3)
    optimizer_steps(before, stop)
    state = before[0].state_dict()
    assert [loader.state_dict() == state for loader in before] == [True, True]  # every rank at one position
    after = layout(dataset, 2, 1, shuffle=True, seed=3)  # one process, three micro-steps
    after[0].load_state_dict(state)
    assert all(a.equal(b) for a, b in zip(optimizer_steps(after, 42 - stop), reference[stop:]))
    back = layout(dataset, 3, 4, shuffle=True, seed=3)  # and on to four ranks
    for loader in back:
        loader.load_state_dict(after[0].state_dict())
    assert back[0].state_dict()["sequence"] == 7 * STEP and back[0].state_dict()["epoch"] == 1


def test_a_state_saved_by_earlier_versions_loads_into_any_layout(dataset):
    """Earlier versions saved the batches one rank had taken ("step") with the batch_size and world_size."""
    reference = optimizer_steps(layout(dataset, 6, 2, shuffle=True, seed=3), 10)
    before = layout(dataset, 6, 2, shuffle=True, seed=3)
    optimizer_steps(before, 4)
    old = {key: value for key, value in before[0].state_dict().items() if key not in ("sequence", "step_sequences")}
    assert old["step"] == 4
    for batch_size, world_size in ((6, 2), (4, 1)):
        after = layout(dataset, batch_size, world_size, shuffle=True, seed=3)
        for loader in after:
            loader.load_state_dict(old)
        assert all(a.equal(b) for a, b in zip(optimizer_steps(after, 6), reference[4:]))


@pytest.mark.parametrize("change, message", [
    (dict(seq_len=8), "saved with seq_len=16 but this loader has seq_len=8; resume with seq_len=16"),
    (dict(step_sequences=24), r"saved with 12 sequences of 16 tokens per optimizer step \(total_batch_tokens=192\) "
                              r"but this run takes 24 \(total_batch_tokens=384\); resume with total_batch_tokens=192"),
    (dict(seed=4), "saved with seed=3 but this loader has seed=4; resume with seed=3"),
    (dict(shuffle=False), "saved with shuffle=True but this loader has shuffle=False"),
])
def test_a_position_in_another_order_is_refused_naming_the_setting(dataset, change, message):
    saved = DataLoader(dataset, "train", batch_size=6, seq_len=16, world_size=2, shuffle=True, seed=3,
                       step_sequences=STEP)
    saved.next_batch()
    kwargs = {**dict(batch_size=4, seq_len=16, shuffle=True, seed=3, step_sequences=STEP), **change}
    with pytest.raises(DataError, match=message):
        DataLoader(dataset, "train", **kwargs).load_state_dict(saved.state_dict())
    unshuffled = DataLoader(dataset, "train", batch_size=4, seq_len=16, step_sequences=STEP, seed=9)
    unshuffled.load_state_dict({**saved.state_dict(), "shuffle": False})  # the seed orders nothing here
    other_data = {**saved.state_dict(), "content_sha256": "0" * 64}
    with pytest.raises(DataError, match="content_sha256='0000.*; resume on the dataset the run was trained on"):
        DataLoader(dataset, "train", batch_size=6, seq_len=16, world_size=2, shuffle=True, seed=3,
                   step_sequences=STEP).load_state_dict(other_data)
    elsewhere = {**saved.state_dict(), "split_range": [0, 5000]}  # the same tokens, another val_fraction
    with pytest.raises(DataError, match=r"saved when the train split was tokens \[0, 5000\) of the dataset, and it "
                                        r"is \[0, \d+\) now \(prepared with another val_fraction"):
        DataLoader(dataset, "train", batch_size=6, seq_len=16, world_size=2, shuffle=True, seed=3,
                   step_sequences=STEP).load_state_dict(elsewhere)
    misaligned = DataLoader(dataset, "train", batch_size=5, seq_len=16, shuffle=True, seed=3, step_sequences=10)
    with pytest.raises(DataError, match="12 windows into epoch 0.* not a whole number of batches of 5 x 1"):
        misaligned.load_state_dict({**saved.state_dict(), "step_sequences": 10})
