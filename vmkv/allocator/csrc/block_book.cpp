#include "block_book.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>

namespace vmkv::alloc {

namespace {

constexpr int64_t kNullBlock = 0;

std::invalid_argument bad(const std::string& message) { return std::invalid_argument(message); }

std::string range_text(int64_t end) { return "[0, " + std::to_string(end) + ")"; }

}  // namespace

BlockBook::BlockBook(int64_t num_blocks, int64_t blocks_per_page)
    : num_blocks_(num_blocks), per_page_(blocks_per_page) {
  if (blocks_per_page <= 0 || blocks_per_page > std::numeric_limits<int32_t>::max())
    throw bad("blocks per page must be in [1, 2^31), got " + std::to_string(blocks_per_page));
  if (num_blocks <= 0 || num_blocks > std::numeric_limits<int32_t>::max())
    throw bad("the block count must be in [1, 2^31), got " + std::to_string(num_blocks));
  num_pages_ = (num_blocks + per_page_ - 1) / per_page_;
  words_per_page_ = (per_page_ + 63) / 64;
  free_bits_.assign(static_cast<size_t>(num_pages_ * words_per_page_), 0);
  free_count_.assign(static_cast<size_t>(num_pages_), 0);
  mapped_.assign(static_cast<size_t>(num_pages_), 0);
  next_.assign(static_cast<size_t>(num_pages_), kNone);
  prev_.assign(static_cast<size_t>(num_pages_), kNone);
  head_.assign(static_cast<size_t>(per_page_ + 1), kNone);
}

int64_t BlockBook::page_size(int64_t page) const {
  return std::min(per_page_, num_blocks_ - page * per_page_);
}

bool BlockBook::is_mapped(int64_t page) const { return page >= 0 && page < num_pages_ && mapped_[page]; }

bool BlockBook::free_bit(int64_t block) const {
  const int64_t page = block / per_page_, slot = block % per_page_;
  return (free_bits_[page * words_per_page_ + slot / 64] >> (slot % 64)) & 1U;
}

void BlockBook::set_free_bit(int64_t block, bool free) {
  const int64_t page = block / per_page_, slot = block % per_page_;
  uint64_t& word = free_bits_[page * words_per_page_ + slot / 64];
  const uint64_t bit = uint64_t{1} << (slot % 64);
  word = free ? (word | bit) : (word & ~bit);
}

bool BlockBook::is_allocated(int64_t block) const {
  return block >= 0 && block < num_blocks_ && mapped_[block / per_page_] && !free_bit(block);
}

int64_t BlockBook::live_blocks(int64_t page) const {
  return is_mapped(page) ? page_size(page) - free_count_[page] : 0;
}

std::vector<int64_t> BlockBook::empty_pages() const { return {empty_.begin(), empty_.end()}; }

// -- where a mapped page is filed --------------------------------------------------------

void BlockBook::unlink(int64_t page) {
  const int32_t free = free_count_[page];
  if (free == page_size(page)) {
    empty_.erase(page);
  } else if (free > 0) {
    if (prev_[page] != kNone) next_[prev_[page]] = next_[page];
    else head_[free] = next_[page];
    if (next_[page] != kNone) prev_[next_[page]] = prev_[page];
    next_[page] = prev_[page] = kNone;
  }
}

void BlockBook::link(int64_t page) {
  const int32_t free = free_count_[page];
  if (free == page_size(page)) {
    empty_.insert(page);
  } else if (free > 0) {
    next_[page] = head_[free];
    prev_[page] = kNone;
    if (head_[free] != kNone) prev_[head_[free]] = static_cast<int32_t>(page);
    head_[free] = static_cast<int32_t>(page);
    room_from_ = std::min<int64_t>(room_from_, free);
  }
}

int64_t BlockBook::best_page() {
  for (int64_t free = room_from_; free < per_page_; ++free) {
    if (head_[free] != kNone) {
      room_from_ = free;
      return head_[free];
    }
  }
  room_from_ = per_page_;
  if (empty_.empty()) throw std::logic_error("vmkv block book: no mapped page has a free block");
  return *empty_.begin();
}

// -- blocks ------------------------------------------------------------------------------

void BlockBook::take_from(int64_t page, int64_t count, std::vector<int64_t>& out) {
  const int64_t first = page * per_page_;
  int64_t taken = 0;
  unlink(page);
  for (int64_t w = 0; w < words_per_page_ && taken < count; ++w) {
    uint64_t& word = free_bits_[page * words_per_page_ + w];
    while (word != 0 && taken < count) {
      const int bit = __builtin_ctzll(word);
      word &= word - 1;
      out.push_back(first + w * 64 + bit);
      ++taken;
    }
  }
  free_count_[page] -= static_cast<int32_t>(taken);
  link(page);
}

std::vector<int64_t> BlockBook::take(int64_t count) {
  if (count <= 0) throw bad("block count must be a positive integer, got " + std::to_string(count));
  if (count > free_mapped_)
    throw std::logic_error("vmkv block book: " + std::to_string(count) + " blocks asked, " +
                           std::to_string(free_mapped_) + " free on mapped pages");
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(count));
  while (static_cast<int64_t>(out.size()) < count)
    take_from(best_page(), count - static_cast<int64_t>(out.size()), out);
  free_mapped_ -= count;
  used_ += count;
  return out;
}

void BlockBook::put(const std::vector<int64_t>& blocks) {
  // Mark as we check, so that a repeat shows; undo every mark if an id is bad.
  size_t checked = 0;
  try {
    for (; checked < blocks.size(); ++checked) {
      const int64_t block = blocks[checked];
      if (block < 0 || block >= num_blocks_)
        throw bad("block id " + std::to_string(block) + " out of range " + range_text(num_blocks_));
      if (block == kNullBlock) throw bad("block 0 is the null block and is never freed");
      if (!is_allocated(block)) {
        const bool repeated = std::find(blocks.begin(), blocks.begin() + checked, block) != blocks.begin() + checked;
        throw bad(repeated ? "block " + std::to_string(block) + " is listed twice"
                           : "block " + std::to_string(block) + " is not allocated (double free or never allocated)");
      }
      set_free_bit(block, true);
    }
  } catch (...) {
    for (size_t i = 0; i < checked; ++i) set_free_bit(blocks[i], false);
    throw;
  }
  // Refile each page once, however many of its blocks came back.
  if (blocks.size() == 1) {
    const int64_t page = blocks[0] / per_page_;
    unlink(page);
    free_count_[page] += 1;
    link(page);
  } else {
    std::unordered_map<int64_t, int32_t> returned;
    for (const int64_t block : blocks) ++returned[block / per_page_];
    for (const auto& [page, count] : returned) {
      unlink(page);
      free_count_[page] += count;
      link(page);
    }
  }
  free_mapped_ += static_cast<int64_t>(blocks.size());
  used_ -= static_cast<int64_t>(blocks.size());
}

// -- whole pages -------------------------------------------------------------------------

void BlockBook::check_page(int64_t page) const {
  if (page < 0 || page >= num_pages_)
    throw bad("KV page " + std::to_string(page) + " out of range " + range_text(num_pages_));
}

void BlockBook::check_distinct_pages(const std::vector<int64_t>& pages) const {
  std::vector<int64_t> sorted(pages);
  std::sort(sorted.begin(), sorted.end());
  const auto repeat = std::adjacent_find(sorted.begin(), sorted.end());
  if (repeat != sorted.end()) throw bad("KV page " + std::to_string(*repeat) + " is listed twice");
}

void BlockBook::add_pages(const std::vector<int64_t>& pages) {
  check_distinct_pages(pages);
  for (const int64_t page : pages) {
    check_page(page);
    if (mapped_[page]) throw bad("KV page " + std::to_string(page) + " is already in the book");
  }
  for (const int64_t page : pages) {
    const int64_t size = page_size(page);
    for (int64_t slot = 0; slot < size; ++slot) set_free_bit(page * per_page_ + slot, true);
    mapped_[page] = 1;
    ++mapped_count_;
    free_count_[page] = static_cast<int32_t>(size);
    free_mapped_ += size;
    if (page == 0) {  // the null block: allocated for good, not counted as used
      set_free_bit(kNullBlock, false);
      free_count_[page] -= 1;
      free_mapped_ -= 1;
    }
    link(page);
  }
}

std::vector<int64_t> BlockBook::retire_empty(int64_t keep) {
  std::vector<int64_t> retired;
  while (static_cast<int64_t>(empty_.size()) > std::max<int64_t>(keep, 0)) {
    const int64_t page = *empty_.rbegin();
    empty_.erase(std::prev(empty_.end()));
    const int64_t size = page_size(page);
    for (int64_t slot = 0; slot < size; ++slot) set_free_bit(page * per_page_ + slot, false);
    mapped_[page] = 0;
    --mapped_count_;
    free_count_[page] = 0;
    free_mapped_ -= size;
    retired.push_back(page);
  }
  std::reverse(retired.begin(), retired.end());
  return retired;
}

void BlockBook::take_whole(const std::vector<int64_t>& pages) {
  check_distinct_pages(pages);
  for (const int64_t page : pages) {
    check_page(page);
    if (!mapped_[page] || free_count_[page] != page_size(page))
      throw bad("KV page " + std::to_string(page) + " is not mapped and empty");
  }
  for (const int64_t page : pages) {
    const int64_t size = page_size(page);
    unlink(page);
    for (int64_t slot = 0; slot < size; ++slot) set_free_bit(page * per_page_ + slot, false);
    free_count_[page] = 0;
    free_mapped_ -= size;
    used_ += size;
  }
}

void BlockBook::put_whole(const std::vector<int64_t>& pages) {
  check_distinct_pages(pages);
  for (const int64_t page : pages) {
    if (page <= 0 || page >= num_pages_)
      throw bad("KV page " + std::to_string(page) + " out of range [1, " + std::to_string(num_pages_) + ")");
    if (!mapped_[page] || free_count_[page] != 0)
      throw bad("KV page " + std::to_string(page) + " is not wholly allocated");
  }
  for (const int64_t page : pages) {
    const int64_t size = page_size(page);
    for (int64_t slot = 0; slot < size; ++slot) set_free_bit(page * per_page_ + slot, true);
    free_count_[page] = static_cast<int32_t>(size);
    free_mapped_ += size;
    used_ -= size;
    link(page);
  }
}

std::vector<std::pair<int64_t, std::vector<int64_t>>> BlockBook::pages_only_holding(
    const std::vector<int64_t>& blocks) const {
  std::unordered_map<int64_t, std::vector<int64_t>> by_page;
  std::vector<int64_t> order;  // pages in first-seen order, for a stable answer
  std::unordered_set<int64_t> seen;  // a block named twice is still one block
  for (const int64_t block : blocks) {
    if (block == kNullBlock || !is_allocated(block) || !seen.insert(block).second) continue;
    auto& held = by_page[block / per_page_];
    if (held.empty()) order.push_back(block / per_page_);
    held.push_back(block);
  }
  std::vector<std::pair<int64_t, std::vector<int64_t>>> out;
  for (const int64_t page : order) {
    auto& held = by_page[page];
    if (static_cast<int64_t>(held.size()) == live_blocks(page)) out.emplace_back(page, std::move(held));
  }
  return out;
}

}  // namespace vmkv::alloc
