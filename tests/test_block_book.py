"""The C++ block book against a model in Python: pages of more than one 64-bit word of
blocks, a short last page, best fit, and bad input leaving it unchanged."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from vmkv.allocator._book import BlockBook

PER_PAGE = 130  # three words of free bits per page
NUM_BLOCKS = 4 * PER_PAGE + 7  # five pages, the last one of 7 blocks
NUM_PAGES = 5


def page_range(page: int) -> range:
    return range(page * PER_PAGE, min((page + 1) * PER_PAGE, NUM_BLOCKS))


class BookMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.book = BlockBook(NUM_BLOCKS, PER_PAGE)
        self.mapped: set[int] = set()
        self.allocated: set[int] = set()  # the null block aside

    def free_on(self, page: int) -> list[int]:
        held = self.allocated | {0}
        return [b for b in page_range(page) if b not in held]

    def snapshot(self):
        book = self.book
        return (
            book.free_mapped,
            book.used,
            book.mapped_pages,
            book.empty_pages(),
            [book.is_allocated(b) for b in range(NUM_BLOCKS)],
        )

    @rule(data=st.data())
    def add(self, data):
        unmapped = sorted(set(range(NUM_PAGES)) - self.mapped)
        if not unmapped:
            return
        pages = data.draw(st.lists(st.sampled_from(unmapped), min_size=1, unique=True))
        self.book.add_pages(pages)
        self.mapped |= set(pages)

    @precondition(lambda self: self.book.free_mapped > 0)
    @rule(data=st.data())
    def take(self, data):
        count = data.draw(st.integers(1, self.book.free_mapped))
        free = {page: len(self.free_on(page)) for page in self.mapped}
        partial = [n for page, n in free.items() if n > 0 and (page == 0 or n < len(page_range(page)))]
        blocks = self.book.take(count)
        assert len(blocks) == len(set(blocks)) == count
        assert not set(blocks) & (self.allocated | {0})
        assert all(b // PER_PAGE in self.mapped for b in blocks)
        first = blocks[0] // PER_PAGE
        if partial:  # best fit: the first page used has the fewest free blocks
            assert free[first] == min(partial)
        else:
            assert first == min(p for p in self.mapped if free[p] > 0)
        # within the first page, its lowest free blocks
        on_first = [b for b in blocks if b // PER_PAGE == first]
        assert on_first == self.free_on(first)[: len(on_first)]
        self.allocated |= set(blocks)

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def put(self, data):
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.allocated)), min_size=1, unique=True))
        self.book.put(blocks)
        self.allocated -= set(blocks)

    @rule(data=st.data())
    def bad_put(self, data):
        never = [b for b in range(1, NUM_BLOCKS) if b not in self.allocated]
        choices = [[0], [NUM_BLOCKS], [-1], ["7"], [True], [2**70], [1.0]]
        if self.allocated:
            some = min(self.allocated)
            choices += [[some, some], [some, "x"]] + ([[some, never[0]]] if never else [])
        bad = data.draw(st.sampled_from(choices))
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.book.put(bad)
        assert self.snapshot() == before

    @rule(keep=st.integers(0, 3))
    def retire(self, keep):
        empty = sorted(p for p in self.mapped if p != 0 and not set(page_range(p)) & self.allocated)
        retired = self.book.retire_empty(keep)
        expected = empty[keep:] if keep < len(empty) else []
        assert retired == sorted(expected)  # the highest empty pages go
        self.mapped -= set(retired)

    @rule(data=st.data())
    def whole_pages(self, data):
        empty = self.book.empty_pages()
        if not empty:
            return
        pages = data.draw(st.lists(st.sampled_from(empty), min_size=1, unique=True))
        self.book.take_whole(pages)
        for page in pages:
            assert all(self.book.is_allocated(b) for b in page_range(page))
        with pytest.raises(ValueError, match="not mapped and empty"):
            self.book.take_whole(pages)
        self.book.put_whole(pages)
        with pytest.raises(ValueError, match="not wholly allocated"):
            self.book.put_whole(pages)

    @rule(data=st.data())
    def only_holding(self, data):
        listed = data.draw(st.lists(st.integers(-2, NUM_BLOCKS + 2), unique=True))
        answer = self.book.pages_only_holding(listed)
        expected = {}
        for page in self.mapped - {0}:  # the null block keeps page 0
            live = [b for b in page_range(page) if b in self.allocated]
            if live and all(b in listed for b in live):
                expected[page] = live
        assert {page: sorted(held) for page, held in answer.items()} == expected

    @invariant()
    def counts_match_the_model(self):
        if not hasattr(self, "book"):
            return
        book = self.book
        assert book.used == len(self.allocated)
        assert book.mapped_pages == len(self.mapped)
        assert book.free_mapped == sum(len(self.free_on(p)) for p in self.mapped)
        empty = sorted(p for p in self.mapped if len(self.free_on(p)) == len(page_range(p)))
        assert book.empty_pages() == empty and book.num_empty == len(empty)
        for page in range(NUM_PAGES):
            assert book.is_mapped(page) == (page in self.mapped)
            live = sum(b in self.allocated or b == 0 for b in page_range(page)) if page in self.mapped else 0
            assert book.live_blocks(page) == live


TestBookMachine = BookMachine.TestCase
TestBookMachine.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)


def test_errors_name_the_bad_id():
    book = BlockBook(NUM_BLOCKS, PER_PAGE)
    book.add_pages([0, 1])
    taken = book.take(3)
    with pytest.raises(ValueError, match=r"block id 'x' is not an integer"):
        book.put(["x"])
    with pytest.raises(ValueError, match=rf"block id {NUM_BLOCKS} out of range \[0, {NUM_BLOCKS}\)"):
        book.put([NUM_BLOCKS])
    with pytest.raises(ValueError, match=f"block {taken[0]} is listed twice"):
        book.put([taken[0], taken[0]])
    with pytest.raises(ValueError, match="block 200 is not allocated"):
        book.put([200])
    with pytest.raises(ValueError, match="null block"):
        book.put([0])
    with pytest.raises(ValueError, match="KV page 1 is already in the book"):
        book.add_pages([1])
    with pytest.raises(ValueError, match="KV page 9 out of range"):
        book.add_pages([9])
    with pytest.raises(ValueError, match="KV page 2 is listed twice"):
        book.add_pages([2, 2])
    with pytest.raises(ValueError, match="must be in"):
        BlockBook(0, PER_PAGE)
    with pytest.raises(RuntimeError, match="free on mapped pages"):
        book.take(book.free_mapped + 1)
