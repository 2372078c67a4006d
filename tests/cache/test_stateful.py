"""Random operation sequences over a small pool, with a simulated KV memory.

The machine writes each request's KV into the blocks its table names, like a model would, and
performs the copy-on-write copies the manager asks for. The simulated KV of position p is
(extra keys, all tokens up to p): like real KV it depends on the whole prefix, so a block
computed after another prefix or under another LoRA/salt reads differently. After every step
the machine checks the pool's bookkeeping and that every request reads its own KV back; every
prefix hit is checked against what the hit blocks really hold.
"""

import struct
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvpage_cache import NULL_BLOCK, BlockPool, KVCacheManager, RequestTooLargeError

NUM_BLOCKS = 10
BS = 4
WINDOW = 6
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=13)
extra_keys_st = st.sampled_from([(), (("salt", "t"),), (("lora", "t"),)])


class CacheMachine(RuleBasedStateMachine):
    hash_fn = None

    def __init__(self):
        super().__init__()
        pool = BlockPool(NUM_BLOCKS, BS, hash_fn=self.hash_fn)
        self.mgr = KVCacheManager(pool, sliding_window=WINDOW)
        self.memory = {block_id: [None] * BS for block_id in range(NUM_BLOCKS)}
        self.tokens: dict[str, list[int]] = {}
        self.extra_keys: dict[str, tuple] = {}
        self.next_id = 0

    # ---- helpers -----------------------------------------------------------------------

    def new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def snapshot(self):
        pool = self.mgr.pool
        return (
            [pool.ref_count(i) for i in range(NUM_BLOCKS)],
            [b.block_id for b in pool.free_queue],
            pool.num_cached_blocks,
            {rid: self.mgr.block_ids(rid) for rid in self.tokens},
        )

    def kv(self, request_id: str, tokens: list[int], position: int):
        return (self.extra_keys[request_id], tuple(tokens[: position + 1]))

    def write(self, request_id: str, tokens: list[int], start: int) -> None:
        """Perform queued copies, then write the KV of tokens[start:] into the request's slots."""
        for src, dst in self.mgr.take_block_copies():
            self.memory[dst] = list(self.memory[src])
        table = self.mgr.block_ids(request_id)
        for position in range(start, len(tokens)):
            self.memory[table[position // BS]][position % BS] = self.kv(
                request_id, tokens, position
            )

    def maybe_commit(self, request_id: str, commit: bool) -> None:
        if commit:
            tokens = self.tokens[request_id]
            self.mgr.commit_full_blocks(request_id, tokens, self.extra_keys[request_id])

    def pick(self, data) -> str:
        return data.draw(st.sampled_from(sorted(self.tokens)))

    # ---- rules -------------------------------------------------------------------------

    @rule(prompt=tokens_st, extra_keys=extra_keys_st, commit=st.booleans())
    def add_request(self, prompt, extra_keys, commit):
        rid = self.new_id()
        self.extra_keys[rid] = extra_keys
        hit = self.mgr.lookup_prefix(rid, prompt, extra_keys)
        assert hit.num_tokens == len(hit.block_ids) * BS < len(prompt)
        for position in range(hit.num_tokens):
            block_id = hit.block_ids[position // BS]
            assert self.memory[block_id][position % BS] == self.kv(rid, prompt, position)
        before = self.snapshot()
        new = self.mgr.allocate_slots(rid, len(prompt) - hit.num_tokens, hit.block_ids)
        if new is None:
            assert self.snapshot() == before and rid not in self.mgr
            return
        self.tokens[rid] = list(prompt)
        self.write(rid, prompt, hit.num_tokens)
        self.maybe_commit(rid, commit)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=tokens_st, lookahead=st.integers(0, 3), commit=st.booleans())
    def decode(self, data, new, lookahead, commit):
        rid = self.pick(data)
        new = new[:5]
        tokens = self.tokens[rid]
        before = self.snapshot()
        try:
            result = self.mgr.allocate_slots(rid, len(new), (), lookahead)
        except RequestTooLargeError:
            assert self.mgr.num_blocks_needed(len(tokens) + len(new) + lookahead) > NUM_BLOCKS
            assert self.snapshot() == before
            return
        if result is None:
            assert self.snapshot() == before
            return
        drafts = [7] * lookahead
        start = len(tokens)
        self.write(rid, tokens + new + drafts, start)
        tokens += new
        if lookahead:
            accepted = data.draw(st.integers(0, lookahead))
            self.mgr.truncate(rid, len(tokens) + accepted)
            tokens += drafts[:accepted]
        self.maybe_commit(rid, commit)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        rid = self.pick(data)
        count = data.draw(st.integers(0, len(self.tokens[rid])))
        self.mgr.commit_full_blocks(rid, self.tokens[rid][:count], self.extra_keys[rid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.pick(data)
        child = self.new_id()
        assert self.mgr.fork(parent, child) == []
        self.tokens[child] = list(self.tokens[parent])
        self.extra_keys[child] = self.extra_keys[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        rid = self.pick(data)
        lowest = self.num_released(rid) * BS
        count = data.draw(st.integers(lowest, len(self.tokens[rid])))
        self.mgr.truncate(rid, count)
        del self.tokens[rid][count:]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release_outside_window(self, data):
        rid = self.pick(data)
        computed = data.draw(st.integers(0, len(self.tokens[rid])))
        self.mgr.free_outside_window(rid, computed)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = self.pick(data)
        self.mgr.free(rid)
        del self.tokens[rid]

    @rule()
    def free_everything_keeps_the_cache(self):
        prompts = [(rid, self.tokens[rid], self.extra_keys[rid]) for rid in self.tokens]
        hits = [self.mgr.lookup_prefix("q", t, keys).block_ids for _, t, keys in prompts]
        for rid, _, _ in prompts:
            self.mgr.free(rid)
        self.tokens.clear()
        assert self.mgr.num_free_blocks == NUM_BLOCKS and self.mgr.usage() == 0.0
        assert hits == [self.mgr.lookup_prefix("q", t, keys).block_ids for _, t, keys in prompts]

    def num_released(self, rid: str) -> int:
        table = self.mgr.block_ids(rid)
        return next((i for i, block_id in enumerate(table) if block_id != NULL_BLOCK), len(table))

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def blocks_are_free_xor_referenced_and_counted(self):
        pool = self.mgr.pool
        held = Counter(
            block_id
            for rid in self.tokens
            for block_id in self.mgr.block_ids(rid)
            if block_id != NULL_BLOCK
        )
        free_ids = [block.block_id for block in pool.free_queue]
        assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
        for block_id in range(NUM_BLOCKS):
            assert pool.ref_count(block_id) == held[block_id]
            assert (held[block_id] > 0) != (block_id in set(free_ids))
        assert pool.num_free_blocks + len(held) == NUM_BLOCKS

    @invariant()
    def every_cached_block_holds_what_its_key_says(self):
        pool = self.mgr.pool
        cached = [block for block in pool.blocks if block.block_hash is not None]
        assert len(cached) == pool.num_cached_blocks
        for block in cached:
            assert pool.cached_block(block.block_hash) is block
            held = tuple(kv[1][-1] for kv in self.memory[block.block_id])
            assert held == struct.unpack(f"<{BS}q", block.token_key)

    @invariant()
    def every_request_reads_its_own_tokens_back(self):
        for rid, tokens in self.tokens.items():
            table = self.mgr.block_ids(rid)
            assert self.mgr.num_tokens(rid) == len(tokens)
            assert len(table) >= self.mgr.num_blocks_needed(len(tokens))
            for position in range(len(tokens)):
                block_id = table[position // BS]
                if block_id != NULL_BLOCK:
                    assert self.memory[block_id][position % BS] == self.kv(rid, tokens, position)
        assert self.mgr.take_block_copies() == []


class WeakHashCacheMachine(CacheMachine):
    """Three hash values in all: collisions everywhere, caught by the stored content."""

    hash_fn = staticmethod(lambda data: bytes([sum(data) % 3]))


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
WeakHashCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestCacheMachine = CacheMachine.TestCase
TestWeakHashCacheMachine = WeakHashCacheMachine.TestCase
