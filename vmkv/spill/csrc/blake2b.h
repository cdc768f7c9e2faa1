// BLAKE2b (RFC 7693), keyed, for the spill tier's keys. A spill hashes one key per block
// before its first copy can start; Python's hashlib costs about 1.5 us per key in call
// overhead alone, which at 64 blocks is a visible share of a 2.4 ms transfer.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace vmkv::spill {

class KeyedBlake2b {
 public:
  // key: 1 to 64 bytes; digest_bytes: 1 to 64.
  KeyedBlake2b(std::string_view key, size_t digest_bytes);

  // Equal to hashlib.blake2b(message, key=key, digest_size=digest_bytes).digest().
  std::string digest(std::string_view message) const;

 private:
  std::array<uint64_t, 8> initial_{};  // the state with no key block compressed
  std::array<uint64_t, 8> keyed_{};  // after the key block, for non-empty messages
  std::array<uint8_t, 128> key_block_{};
  size_t digest_bytes_;
};

}  // namespace vmkv::spill
