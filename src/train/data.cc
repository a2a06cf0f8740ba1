#include "train/data.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/atomic_file.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace fs = std::filesystem;

namespace {

bool IsJsonl(const fs::path& p) { return p.extension() == ".jsonl"; }

void AddFile(const fs::path& p, std::vector<Document>* docs, CorpusStats* st) {
  std::string text = ReadRegularFile(p.string(), "data file");
  ++st->files;
  st->bytes += static_cast<int64_t>(text.size());
  if (!IsJsonl(p)) {
    if (!text.empty()) docs->push_back({std::string(), std::move(text)});
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
    auto str = [&](const char* key) -> const nlohmann::json* {
      return j.is_object() && j.contains(key) && j[key].is_string() ? &j[key] : nullptr;
    };
    if (const nlohmann::json* t = str("text")) {
      if (!t->get_ref<const std::string&>().empty()) docs->push_back({std::string(), t->get<std::string>()});
    } else if (str("prompt") && str("completion")) {
      docs->push_back({str("prompt")->get<std::string>(), str("completion")->get<std::string>()});
    } else {
      Fail("%s line %lld has neither a \"text\" string nor \"prompt\" and \"completion\" strings", p.c_str(),
           static_cast<long long>(n));
    }
  }
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<Document> ReadDocuments(const std::vector<std::string>& paths, CorpusStats* st) {
  std::vector<Document> docs;
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

namespace {

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f'; }

// Where a document may be cut so that its pieces tokenize to the same tokens as the whole: just
// after a single newline that follows a non-space and precedes a non-space. No pre-tokenizer
// pattern of the byte-level BPE vocabularies joins across such a point, and no SentencePiece
// piece spans a newline; an SPM vocabulary that adds a space prefix would add one to every piece,
// so those are not cut. Pieces are about `target` bytes.
std::vector<std::pair<size_t, size_t>> Pieces(const std::string& d, bool can_cut, size_t target) {
  std::vector<std::pair<size_t, size_t>> out;
  size_t begin = 0;
  while (can_cut && d.size() - begin > 2 * target) {
    size_t p = begin + target;
    while (p < d.size() && !(d[p - 1] == '\n' && p >= 2 && !IsSpace(d[p - 2]) && !IsSpace(d[p]))) ++p;
    if (p >= d.size()) break;
    out.push_back({begin, p - begin});
    begin = p;
  }
  out.push_back({begin, d.size() - begin});
  return out;
}

}  // namespace

TokenStream TokenizeDocuments(const std::vector<Document>& docs, const Tokenizer& tok, ThreadPool* pool,
                              CorpusStats* st) {
  if (!tok.HasVocab())
    Fail("the model has no vocabulary (tokenizer.ggml.model = none), so it cannot read text: build it on one "
         "(moe tokenizer train, then moe init --tokenizer)");
  const bool can_cut = !tok.add_eos() && (tok.model() == "gpt2" || (tok.model() == "llama" && !tok.add_space_prefix()));
  bool any_prompt = false;
  struct Piece {
    size_t doc, begin, len;
    bool first, last;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < docs.size(); ++i) {
    any_prompt = any_prompt || !docs[i].prompt.empty();
    const auto cuts = Pieces(docs[i].text, can_cut && docs[i].prompt.empty(), 256 * 1024);
    for (size_t j = 0; j < cuts.size(); ++j)
      pieces.push_back({i, cuts[j].first, cuts[j].second, j == 0, j + 1 == cuts.size()});
  }
  std::vector<std::vector<int32_t>> parts(pieces.size());
  std::vector<size_t> n_prompt(pieces.size(), 0);  // leading tokens of the piece that are context only
  auto run = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Piece& pc = pieces[i];
      const Document& d = docs[pc.doc];
      std::vector<int32_t>& out = parts[i];
      if (!d.prompt.empty()) {  // prompt (with BOS) as context, then the completion
        out = tok.Encode(d.prompt, /*add_special=*/true);
        n_prompt[i] = out.size();
        const std::vector<int32_t> c = tok.Encode(d.text, /*add_special=*/false);
        out.insert(out.end(), c.begin(), c.end());
      } else {
        out = tok.Encode(std::string_view(d.text).substr(pc.begin, pc.len), /*add_special=*/pc.first);
        if (pc.first && !out.empty() && tok.add_bos() && out[0] == tok.bos()) n_prompt[i] = 1;  // BOS: not a target
      }
      if (pc.last && tok.eos() >= 0 && !tok.add_eos()) out.push_back(tok.eos());
    }
  };
  if (pool == nullptr || pool->size() == 1 || pieces.size() < 2) {
    run(0, static_cast<int64_t>(pieces.size()));
  } else {
    pool->ParallelFor(static_cast<int64_t>(pieces.size()), 1, [&](int64_t b, int64_t e, int) { run(b, e); });
  }
  TokenStream s;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (any_prompt && pieces[i].first) s.doc_starts.push_back(static_cast<int64_t>(s.tokens.size()));
    s.tokens.insert(s.tokens.end(), parts[i].begin(), parts[i].end());
    if (any_prompt) {
      s.target.insert(s.target.end(), n_prompt[i], 0);
      s.target.insert(s.target.end(), parts[i].size() - n_prompt[i], 1);
    }
  }
  st->tokens += static_cast<int64_t>(s.tokens.size());
  return s;
}

Sequences Pack(const TokenStream& stream, int seq_len) {
  Sequences s;
  s.seq_len = seq_len;
  const std::vector<int32_t>& t = stream.tokens;
  if (seq_len <= 0 || t.size() < static_cast<size_t>(seq_len) + 1) return s;
  const int64_t n = (static_cast<int64_t>(t.size()) - 1) / seq_len;
  s.data.reserve(static_cast<size_t>(n) * (seq_len + 1));
  for (int64_t i = 0; i < n; ++i) {
    s.data.insert(s.data.end(), t.begin() + i * seq_len, t.begin() + i * seq_len + seq_len + 1);
    if (stream.target.empty()) continue;
    const int64_t s0 = i * seq_len;
    for (int64_t q = s0; q <= s0 + seq_len; ++q) {
      // The document of token q: the last start <= q; its start must be inside this sequence.
      const auto it = std::upper_bound(stream.doc_starts.begin(), stream.doc_starts.end(), q);
      const int64_t start = it == stream.doc_starts.begin() ? 0 : *(it - 1);
      s.target.push_back(stream.target[q] && start >= s0 ? 1 : 0);
    }
  }
  return s;
}

int64_t Sequences::Targets(int64_t i) const {
  if (target.empty()) return seq_len;
  int64_t n = 0;
  for (int j = 1; j <= seq_len; ++j) n += target[static_cast<size_t>(i) * (seq_len + 1) + j];
  return n;
}

Sequences SplitTail(Sequences* from, int64_t n) {
  Sequences out;
  out.seq_len = from->seq_len;
  n = std::min(n, from->size());
  const size_t keep = static_cast<size_t>(from->size() - n) * (from->seq_len + 1);
  out.data.assign(from->data.begin() + keep, from->data.end());
  from->data.resize(keep);
  if (!from->target.empty()) {
    out.target.assign(from->target.begin() + keep, from->target.end());
    from->target.resize(keep);
  }
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
