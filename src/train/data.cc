#include "train/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) Fail("cannot read data file %s", p.c_str());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) Fail("cannot read data file %s", p.c_str());
  return ss.str();
}

bool IsJsonl(const fs::path& p) { return p.extension() == ".jsonl"; }

void AddFile(const fs::path& p, std::vector<std::string>* docs, CorpusStats* st) {
  std::string text = ReadFile(p);
  ++st->files;
  st->bytes += static_cast<int64_t>(text.size());
  if (!IsJsonl(p)) {
    if (!text.empty()) docs->push_back(std::move(text));
    return;
  }
  std::istringstream lines(text);
  std::string line;
  int64_t n = 0;
  while (std::getline(lines, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      Fail("%s line %lld is not JSON (%s)", p.c_str(), static_cast<long long>(n), e.what());
    }
    if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
      Fail("%s line %lld has no \"text\" string field", p.c_str(), static_cast<long long>(n));
    std::string t = j["text"].get<std::string>();
    if (!t.empty()) docs->push_back(std::move(t));
  }
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<std::string> ReadDocuments(const std::vector<std::string>& paths, CorpusStats* st) {
  std::vector<std::string> docs;
  if (paths.empty()) Fail("no data: give --data PATH (text files, folders or .jsonl)");
  for (const std::string& path : paths) {
    std::error_code ec;
    const fs::file_status s = fs::status(path, ec);
    if (ec || !fs::exists(s)) Fail("data path %s does not exist", path.c_str());
    if (fs::is_directory(s)) {
      std::vector<fs::path> files;
      for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec)) {
        if (it->is_regular_file()) files.push_back(it->path());
      }
      if (ec) Fail("cannot list data folder %s: %s", path.c_str(), ec.message().c_str());
      std::sort(files.begin(), files.end());
      for (const fs::path& f : files) AddFile(f, &docs, st);
    } else {
      AddFile(path, &docs, st);
    }
  }
  st->documents = static_cast<int64_t>(docs.size());
  if (docs.empty()) {
    std::string list;
    for (const std::string& p : paths) list += (list.empty() ? "" : ", ") + p;
    Fail("the data (%s) holds no text", list.c_str());
  }
  return docs;
}

std::vector<int32_t> TokenizeDocuments(const std::vector<std::string>& docs, const Tokenizer& tok, ThreadPool* pool,
                                       CorpusStats* st) {
  if (!tok.HasVocab())
    Fail("the model has no vocabulary (tokenizer.ggml.model = none), so it cannot read text: build it on one "
         "(moe tokenizer train, then moe init --tokenizer)");
  std::vector<std::vector<int32_t>> parts(docs.size());
  auto run = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      parts[i] = tok.Encode(docs[i], /*add_special=*/true);
      if (tok.eos() >= 0 && !tok.add_eos()) parts[i].push_back(tok.eos());
    }
  };
  if (pool == nullptr || pool->size() == 1 || docs.size() < 2) {
    run(0, static_cast<int64_t>(docs.size()));
  } else {
    pool->ParallelFor(static_cast<int64_t>(docs.size()), 1, [&](int64_t b, int64_t e, int) { run(b, e); });
  }
  std::vector<int32_t> stream;
  for (const auto& p : parts) stream.insert(stream.end(), p.begin(), p.end());
  st->tokens += static_cast<int64_t>(stream.size());
  return stream;
}

Sequences Pack(const std::vector<int32_t>& stream, int seq_len) {
  Sequences s;
  s.seq_len = seq_len;
  if (seq_len <= 0 || stream.size() < static_cast<size_t>(seq_len) + 1) return s;
  const int64_t n = (static_cast<int64_t>(stream.size()) - 1) / seq_len;
  s.data.reserve(static_cast<size_t>(n) * (seq_len + 1));
  for (int64_t i = 0; i < n; ++i)
    s.data.insert(s.data.end(), stream.begin() + i * seq_len, stream.begin() + i * seq_len + seq_len + 1);
  return s;
}

Sequences SplitTail(Sequences* from, int64_t n) {
  Sequences out;
  out.seq_len = from->seq_len;
  n = std::min(n, from->size());
  const size_t keep = static_cast<size_t>(from->size() - n) * (from->seq_len + 1);
  out.data.assign(from->data.begin() + keep, from->data.end());
  from->data.resize(keep);
  return out;
}

std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  uint64_t state = seed * 0x2545f4914f6cdd1dULL + static_cast<uint64_t>(epoch) + 1;
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(SplitMix64(state) % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

}  // namespace moe
