"""The needle task: prompts and training batches of key-value recall.

The task is key-value recall over random filler tokens. A needle

    KEY k1 k2 VAL v1 v2 v3 v4

sits at some depth of a haystack of random content tokens, and the prompt ends with
the question ``QUERY k1 k2 VAL``; the answer is ``v1 v2 v3 v4`` (greedy decoding).
The model only ever sees sequences of at most ``TRAINED_LENGTH`` tokens; everything
past that length measures length extrapolation.
"""

import torch

# Token ids. Content tokens (filler, keys, values) are the ids from FIRST_CONTENT on;
# the ids below it are markers that never occur in filler.
PAD, BOS, KEY, VAL, QUERY = 0, 1, 2, 3, 4
FIRST_CONTENT = 16
VOCAB_SIZE = 512
KEY_LEN = 2
VALUE_LEN = 4
NEEDLE_LEN = 2 + KEY_LEN + VALUE_LEN  # KEY, keys, VAL, values
QUESTION_LEN = 2 + KEY_LEN  # QUERY, keys, VAL
TRAINED_LENGTH = 512
# The shortest prompt make_sample builds: BOS, room for twice a needle, the question.
MIN_LENGTH = 1 + 2 * NEEDLE_LEN + QUESTION_LEN


def _content(generator, *shape, device="cpu"):
    return torch.randint(FIRST_CONTENT, VOCAB_SIZE, shape, generator=generator, device=device)


def make_sample(length, depth, seed, distractors=0):
    """One needle-in-a-haystack prompt and its answer.

    Parameters
    ----------
    length : int
        Prompt length in tokens, question included (at least
        ``1 + 2 * (1 + distractors) * NEEDLE_LEN + QUESTION_LEN``).
    depth : float
        Where the needle starts, as a fraction of the haystack: 0.0 right after BOS,
        1.0 right before the question.
    seed : int
        Seeds the filler, the key, the value and the distractors.
    distractors : int
        Extra key-value pairs with other keys, placed at random depths.

    Returns
    -------
    input_ids : torch.LongTensor [length]
        ``BOS, filler..., KEY k1 k2 VAL v1..v4, filler..., QUERY k1 k2 VAL``.
    answer_ids : torch.LongTensor [VALUE_LEN]
        ``v1..v4``.

    Examples
    --------
    >>> ids, answer = make_sample(512, 0.5, seed=0)
    >>> ids.shape, answer.shape
    (torch.Size([512]), torch.Size([4]))
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    haystack = length - 1 - QUESTION_LEN
    # Twice the needles' length guarantees room for a random place that overlaps none.
    if haystack < 2 * (1 + distractors) * NEEDLE_LEN:
        raise ValueError(f"length {length} is too short for {1 + distractors} needles")
    g = torch.Generator().manual_seed(seed)
    ids = _content(g, length)
    ids[0] = BOS
    # Keys are distinct so that the question has one answer.
    keys = []
    while len(keys) < 1 + distractors:
        k = _content(g, KEY_LEN)
        if not any(torch.equal(k, other) for other in keys):
            keys.append(k)
    values = _content(g, 1 + distractors, VALUE_LEN)
    slots = haystack - NEEDLE_LEN
    starts = [1 + round(depth * slots)]
    # Distractors go where they overlap neither the needle nor each other.
    while len(starts) < 1 + distractors:
        s = 1 + int(torch.randint(0, slots + 1, (1,), generator=g))
        if all(abs(s - t) >= NEEDLE_LEN for t in starts):
            starts.append(s)
    for s, k, v in zip(starts, keys, values):
        ids[s : s + NEEDLE_LEN] = torch.cat([torch.tensor([KEY]), k, torch.tensor([VAL]), v])
    ids[-QUESTION_LEN:] = torch.cat([torch.tensor([QUERY]), keys[0], torch.tensor([VAL])])
    return ids, values[0].clone()


def make_batch(batch, length, generator, max_pairs=8, device="cpu"):
    """A training batch of key-value recall: pairs and their questions among filler.

    Each sequence holds between 1 and ``max_pairs`` key-value pairs and one question
    per pair, placed at random after its pair, so the distances between needle and
    question cover 0..length and every prefix is itself a short sample.

    Parameters
    ----------
    batch, length : int
        Output shape.
    generator : torch.Generator
        On ``device``; drives all randomness.
    max_pairs : int
        Pairs per sequence at most (``2 * max_pairs * NEEDLE_LEN < length``).

    Returns
    -------
    input_ids : torch.LongTensor [batch, length]
    labels : torch.LongTensor [batch, length]
        The answer tokens of every question, -100 elsewhere; aligned with
        ``input_ids`` (the model shifts them).
    """
    item = NEEDLE_LEN  # a question with its answer is as long as a needle
    n_items = 2 * max_pairs
    fill = length - 1 - n_items * item
    if fill < 0:
        raise ValueError(f"length {length} cannot hold {max_pairs} pairs")

    def rand(*shape):
        return torch.rand(shape, generator=generator, device=device)

    ids = _content(generator, batch, length, device=device)
    ids[:, 0] = BOS
    labels = torch.full_like(ids, -100)

    # Order items by a random time: a pair at u, its question later, at u + (1 - u) w.
    u = rand(batch, max_pairs)
    t = torch.cat([u, u + (1 - u) * rand(batch, max_pairs).clamp_min(1e-3)], dim=1)
    order = t.argsort(dim=1)
    # Random gaps of filler between items: sorted cut points of the filler budget.
    cuts = (rand(batch, n_items) * (fill + 1)).floor().long().sort(dim=1).values
    slot = torch.empty_like(order)
    slot.scatter_(1, order, torch.arange(n_items, device=device).expand(batch, -1))
    start = 1 + cuts.gather(1, slot) + slot * item  # [batch, n_items]

    # Unused pairs (and their questions) stay filler: 1..max_pairs pairs per row.
    n_pairs = torch.randint(1, max_pairs + 1, (batch, 1), generator=generator, device=device)
    used = torch.arange(max_pairs, device=device) < n_pairs
    keys = _content(generator, batch, max_pairs, KEY_LEN, device=device)
    values = _content(generator, batch, max_pairs, VALUE_LEN, device=device)

    def marker(tok):
        return torch.full((batch, max_pairs, 1), tok, device=device)

    pair = torch.cat([marker(KEY), keys, marker(VAL), values], dim=2)
    question = torch.cat([marker(QUERY), keys, marker(VAL), values], dim=2)
    tokens = torch.cat([pair, question], dim=1)  # [batch, n_items, item]
    target = tokens.clone()
    target[:, :max_pairs] = -100
    target[:, max_pairs:, : item - VALUE_LEN] = -100
    keep = torch.cat([used, used], dim=1)

    pos = start.unsqueeze(2) + torch.arange(item, device=device)  # [batch, n_items, item]
    rows = torch.arange(batch, device=device).view(batch, 1, 1).expand_as(pos)
    ids[rows[keep], pos[keep]] = tokens[keep]
    labels[rows[keep], pos[keep]] = target[keep]
    return ids, labels
