#include "blake2b.h"

#include <cstring>
#include <stdexcept>

namespace vmkv::spill {
namespace {

constexpr std::array<uint64_t, 8> kIv = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                                         0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                                         0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

constexpr size_t kBlockBytes = 128;

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t x = 0;
  for (int i = 7; i >= 0; --i) x = (x << 8) | p[i];
  return x;
}

inline void mix(uint64_t* v, int a, int b, int c, int d, uint64_t x, uint64_t y) {
  v[a] = v[a] + v[b] + x;
  v[d] = rotr(v[d] ^ v[a], 32);
  v[c] = v[c] + v[d];
  v[b] = rotr(v[b] ^ v[c], 24);
  v[a] = v[a] + v[b] + y;
  v[d] = rotr(v[d] ^ v[a], 16);
  v[c] = v[c] + v[d];
  v[b] = rotr(v[b] ^ v[c], 63);
}

// One compression of a 128-byte block; `counter` is the byte count hashed so far,
// this block included (messages here are far below 2^64 bytes).
void compress(std::array<uint64_t, 8>& h, const uint8_t* block, uint64_t counter, bool last) {
  uint64_t m[16];
  for (int i = 0; i < 16; ++i) m[i] = load_le64(block + 8 * i);
  uint64_t v[16];
  for (int i = 0; i < 8; ++i) {
    v[i] = h[i];
    v[i + 8] = kIv[i];
  }
  v[12] ^= counter;
  if (last) v[14] = ~v[14];
  for (const auto& s : kSigma) {
    mix(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    mix(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    mix(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    mix(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    mix(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    mix(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    mix(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    mix(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

}  // namespace

KeyedBlake2b::KeyedBlake2b(std::string_view key, size_t digest_bytes) : digest_bytes_(digest_bytes) {
  if (key.empty() || key.size() > 64) throw std::invalid_argument("a BLAKE2b key is 1 to 64 bytes");
  if (digest_bytes == 0 || digest_bytes > 64) throw std::invalid_argument("a BLAKE2b digest is 1 to 64 bytes");
  initial_ = kIv;
  initial_[0] ^= 0x01010000ULL ^ (static_cast<uint64_t>(key.size()) << 8) ^ digest_bytes;
  std::memcpy(key_block_.data(), key.data(), key.size());
  keyed_ = initial_;
  compress(keyed_, key_block_.data(), kBlockBytes, false);
}

std::string KeyedBlake2b::digest(std::string_view message) const {
  std::array<uint64_t, 8> h = keyed_;
  uint64_t counter = kBlockBytes;
  if (message.empty()) {  // the key block is the last block
    h = initial_;
    compress(h, key_block_.data(), kBlockBytes, true);
  } else {
    const auto* data = reinterpret_cast<const uint8_t*>(message.data());
    size_t left = message.size();
    while (left > kBlockBytes) {  // every full block but the last
      counter += kBlockBytes;
      compress(h, data, counter, false);
      data += kBlockBytes;
      left -= kBlockBytes;
    }
    uint8_t block[kBlockBytes] = {};
    std::memcpy(block, data, left);
    compress(h, block, counter + left, true);
  }
  std::string out(digest_bytes_, '\0');
  for (size_t i = 0; i < digest_bytes_; ++i) out[i] = static_cast<char>(h[i / 8] >> (8 * (i % 8)));
  return out;
}

}  // namespace vmkv::spill
