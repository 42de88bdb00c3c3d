// nestkv's placement ("rendezvous-sha256-splitmix64") in Node.js, written from the top comment
// of protos/nestkv/v1/store.proto alone: what a client in another language needs to send each
// operation to its key's owner itself.
// Usage: node placement.js VECTORS_JSON
// For each vector of VECTORS_JSON (tests/placement_vectors.json's shape) it takes the path, the
// key, the member ids of `scores` and the member lists of `owners` (comma-joined ids), computes
// everything else and prints one JSON object: {"hash": ..., "vectors": [{path, key,
// encoding_hex, key_hash, scores, owners}, ...]}, hashes and scores as 16 hex digits.
// It needs no npm package: node's crypto for SHA-256, BigInt for 64-bit arithmetic.
"use strict";
const crypto = require("crypto");
const fs = require("fs");

const HASH = "rendezvous-sha256-splitmix64";
const MASK64 = (1n << 64n) - 1n;

function utf8(text) {
  return Buffer.from(text, "utf8");
}

// u32: 4 bytes big-endian.
function u32(n) {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(n);
  return bytes;
}

// u32(len) + the bytes, for a string taken as its UTF-8 bytes.
function lengthPrefixed(text) {
  const bytes = utf8(text);
  return Buffer.concat([u32(bytes.length), bytes]);
}

// encoding(path, key) = u32(len(path)) + for each segment: u32(len(s)) + s
//                       + u32(len(key)) + key
// len(path) counts segments; len(s) and len(key) count UTF-8 bytes; the key comes once, after
// the segments (the vector of path [] and key "k" settles it: 00000000 00000001 6b).
function encoding(path, key) {
  return Buffer.concat([u32(path.length), ...path.map(lengthPrefixed), lengthPrefixed(key)]);
}

// h64(data) = the first 8 bytes of SHA-256(data), big-endian unsigned
function h64(data) {
  return crypto.createHash("sha256").update(data).digest().readBigUInt64BE(0);
}

// SplitMix64's finaliser, modulo 2^64.
function mix(z) {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

// score(node) = mix(h64(encoding(path, key)) XOR h64(UTF-8 of node id))
function score(keyHash, nodeId) {
  return mix(keyHash ^ h64(utf8(nodeId)));
}

// owner = the member with the highest score (equal scores: the smallest id by its UTF-8 bytes)
function owner(keyHash, members) {
  let best = null;
  let bestScore = -1n;
  for (const id of members) {
    const s = score(keyHash, id);
    const smallerId = best !== null && Buffer.compare(utf8(id), utf8(best)) < 0;
    if (s > bestScore || (s === bestScore && smallerId)) {
      best = id;
      bestScore = s;
    }
  }
  return best;
}

function hex64(n) {
  return n.toString(16).padStart(16, "0");
}

const file = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
if (file.hash !== HASH) {
  throw new Error(`the vectors are for ${JSON.stringify(file.hash)}; this program does ${HASH}`);
}
const vectors = file.vectors.map(({ path, key, scores, owners }) => {
  const keyHash = h64(encoding(path, key));
  return {
    path,
    key,
    encoding_hex: encoding(path, key).toString("hex"),
    key_hash: hex64(keyHash),
    scores: Object.fromEntries(Object.keys(scores).map((id) => [id, hex64(score(keyHash, id))])),
    owners: Object.fromEntries(
      Object.keys(owners).map((members) => [members, owner(keyHash, members.split(","))]),
    ),
  };
});
console.log(JSON.stringify({ hash: HASH, vectors }));
