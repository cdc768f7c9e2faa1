// The block allocator's bookkeeping: which blocks of which mapped KV pages are free.
//
// vLLM asks for blocks and returns them on every scheduling step, one request at a time,
// so this is the allocator's hot path; it lives here, not in Python, for that reason
// only. It knows nothing of mapping: the Python BlockAllocator maps a page, then adds it
// here with all its blocks free, and retires it here before unmapping it.
//
// Block b lives on page b / blocks_per_page; the last page may be short. Block 0 is the
// engines' null block: allocated from the moment page 0 is added, never counted as used,
// never freed. A mapped page is in exactly one place: the set of empty pages (every block
// free), the list of pages with exactly k free blocks (0 < k < its size), or nowhere
// (full). take() fills the page with the fewest free blocks first (best fit), so that
// frees leave whole pages empty, and within a page the lowest free block.
//
// Every mutating call validates all of its input before it changes anything, and throws
// std::invalid_argument naming the first bad id.
#pragma once

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace vmkv::alloc {

class BlockBook {
 public:
  BlockBook(int64_t num_blocks, int64_t blocks_per_page);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t blocks_per_page() const { return per_page_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_mapped() const { return free_mapped_; }  // free blocks on mapped pages
  int64_t used() const { return used_; }                // allocated, the null block aside
  int64_t mapped_pages() const { return mapped_count_; }
  int64_t num_empty() const { return static_cast<int64_t>(empty_.size()); }

  int64_t page_size(int64_t page) const;  // blocks on `page` (the last one may be short)
  bool is_mapped(int64_t page) const;
  bool is_allocated(int64_t block) const;
  int64_t live_blocks(int64_t page) const;  // allocated blocks on a mapped page, else 0
  std::vector<int64_t> empty_pages() const;  // lowest first

  // Blocks. take() needs count <= free_mapped().
  std::vector<int64_t> take(int64_t count);
  void put(const std::vector<int64_t>& blocks);

  // Whole pages. add: unmapped pages become mapped, every block free. retire_empty: the
  // highest empty pages beyond `keep` leave the book (to be unmapped), returned lowest
  // first. take_whole: empty pages, every block allocated. put_whole: the reverse.
  void add_pages(const std::vector<int64_t>& pages);
  std::vector<int64_t> retire_empty(int64_t keep);
  void take_whole(const std::vector<int64_t>& pages);
  void put_whole(const std::vector<int64_t>& pages);

  // Mapped pages whose every allocated block is among `blocks` (freeing those blocks
  // would empty them), each with those blocks. Ids that are out of range, free or the
  // null block are ignored: callers pass what a cache listed, which may be stale.
  std::vector<std::pair<int64_t, std::vector<int64_t>>> pages_only_holding(
      const std::vector<int64_t>& blocks) const;

 private:
  static constexpr int32_t kNone = -1;

  bool free_bit(int64_t block) const;
  void set_free_bit(int64_t block, bool free);
  void check_page(int64_t page) const;
  void check_distinct_pages(const std::vector<int64_t>& pages) const;
  void unlink(int64_t page);
  void link(int64_t page);
  int64_t best_page();
  void take_from(int64_t page, int64_t count, std::vector<int64_t>& out);  // lowest free first

  int64_t num_blocks_, per_page_, num_pages_, words_per_page_;
  int64_t free_mapped_ = 0, used_ = 0, mapped_count_ = 0;
  std::vector<uint64_t> free_bits_;  // words_per_page_ words per page; 1 = free
  std::vector<int32_t> free_count_;  // per mapped page
  std::vector<uint8_t> mapped_;
  // Partly used pages, a doubly linked list per free count (heads indexed by count).
  std::vector<int32_t> next_, prev_, head_;
  int64_t room_from_ = 1;  // no partly used page has fewer free blocks than this
  std::set<int64_t> empty_;
};

}  // namespace vmkv::alloc
