// llama.cpp's tokenization of texts, through node-llama-cpp (the test oracle).
//   node tokenize_oracle.mjs MANIFEST.json OUT.json
// MANIFEST: {"vocabs": [{"name", "path"}...], "texts": [string...]} (make_vocab.py writes one).
// OUT: {"vocabs": [{"name", "bos", "eos", "eot", "add_bos", "add_eos", "n_vocab", "eog": [ids],
//        "texts": [{"ids", "ids_special", "detok", "detok_special"}...],
//        "piece_ids": [ids], "pieces": [string per piece id], "pieces_special": [...]}...]}
// ids: model.tokenize(text, false) = llama_tokenize(add_special=false, parse_special=false);
// ids_special: parse_special=true; detok*: llama_detokenize(remove_special=false, unparse_special)
// of those ids; pieces*: the detokenization of each single id in piece_ids (every
// manifest "piece_stride"-th id, default every id). Strings are what JavaScript
// received: bytes that are not valid UTF-8 arrive as U+FFFD.
import fs from "node:fs";
import path from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const nlcIndex = path.join(root, "third_party", "npm", "node_modules", "node-llama-cpp", "dist",
                           "index.js");
if (!fs.existsSync(nlcIndex)) {
  console.error(`node-llama-cpp is missing (${nlcIndex}): run scripts/setup.sh`);
  process.exit(3);
}
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(nlcIndex).href);

const [manifestPath, outPath] = process.argv.slice(2);
if (!manifestPath || !outPath) {
  console.error("usage: node tokenize_oracle.mjs MANIFEST.json OUT.json");
  process.exit(2);
}
const manifest = JSON.parse(fs.readFileSync(manifestPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", skipDownload: true,
                              usePrebuiltBinaries: true, logLevel: LlamaLogLevel.error});
const out = {vocabs: []};
for (const v of manifest.vocabs) {
  const model = await llama.loadModel({modelPath: v.path, vocabOnly: true, gpuLayers: 0});
  const ids = [...model.iterateAllTokens()];
  const stride = v.piece_stride ?? 1;
  const pieceIds = ids.filter((id) => id % stride === 0);
  const r = {
    name: v.name,
    bos: model.tokens.bos ?? -1,
    eos: model.tokens.eos ?? -1,
    eot: model.tokens.eot ?? -1,
    add_bos: model.tokens.shouldPrependBosToken,
    add_eos: model.tokens.shouldAppendEosToken,
    n_vocab: ids.length,
    eog: ids.filter((id) => model.isEogToken(id)),
    texts: [],
    piece_ids: pieceIds,
    pieces: pieceIds.map((id) => model.detokenize([id], false)),
    pieces_special: pieceIds.map((id) => model.detokenize([id], true)),
  };
  for (const text of manifest.texts) {
    const plain = model.tokenize(text, false);
    const special = model.tokenize(text, true);
    r.texts.push({
      ids: Array.from(plain),
      ids_special: Array.from(special),
      detok: model.detokenize(plain, false),
      detok_special: model.detokenize(special, true),
    });
  }
  out.vocabs.push(r);
  await model.dispose();
}
fs.writeFileSync(outPath, JSON.stringify(out));
await llama.dispose();
