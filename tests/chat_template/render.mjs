// Reference renderer: every conversation in conversations.json through every real template in
// templates/ with @huggingface/jinja, printed as JSON for tests/engine/chat_template_test.cpp.
//
// Usage: node tests/chat_template/render.mjs   (after tests/chat_template/install.sh)
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Template } from "@huggingface/jinja";

const here = dirname(fileURLToPath(import.meta.url));
// The values of "bos_token" / "eos_token" in the DeepSeek checkpoints' tokenizer_config.json.
const BOS = "<｜begin▁of▁sentence｜>";
const EOS = "<｜end▁of▁sentence｜>";

// The same reading of OpenAI messages as dilu's parse_messages (engine/chat_template.cpp): a list of
// text parts is joined with "\n" (as vLLM does), "tool_calls": null counts as absent, and an
// assistant turn with tool calls but no "content" has null content. Everything else goes to the
// template untouched, extra fields included.
function asTemplateMessage(message) {
  const m = { ...message };
  if (Array.isArray(m.content)) m.content = m.content.map((part) => part.text).join("\n");
  if (m.tool_calls === null) delete m.tool_calls;
  if (m.role === "assistant" && m.tool_calls && !("content" in m)) m.content = null;
  return m;
}

const conversations = JSON.parse(readFileSync(join(here, "conversations.json"), "utf8"));
const templateFiles = readdirSync(join(here, "templates")).filter((f) => f.endsWith(".jinja")).sort();
const results = [];
for (const file of templateFiles) {
  const name = file.slice(0, -".jinja".length);
  const template = new Template(readFileSync(join(here, "templates", file), "utf8"));
  for (const conversation of conversations) {
    for (const addGenerationPrompt of [false, true]) {
      const text = template.render({
        messages: conversation.messages.map(asTemplateMessage),
        bos_token: BOS,
        eos_token: EOS,
        add_generation_prompt: addGenerationPrompt,
      });
      results.push({ template: name, conversation: conversation.id, add_generation_prompt: addGenerationPrompt, text });
    }
  }
}
const version = JSON.parse(readFileSync(join(here, "node_modules/@huggingface/jinja/package.json"), "utf8")).version;
process.stdout.write(JSON.stringify({ renderer: `@huggingface/jinja ${version}`, results }) + "\n");
