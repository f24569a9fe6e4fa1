// `dilu tokenize`: token ids of JSONL lines on stdin, for counting the tokens of a dataset.
// {"text": ...} is encoded without special tokens; {"prompt": ...} and {"messages": [...]} are
// encoded exactly as `dilu run` encodes them (BOS, chat template).
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "engine/prompt_encoder.h"
#include "kernels/error.h"

namespace dilu::app {

namespace {

int tokenize(const std::string& model_dir) {
  const PromptEncoder encoder(model_dir);
  DILU_USER_CHECK(encoder.tokenizer() != nullptr, "model directory '", model_dir,
                  "' has no tokenizer.json; dilu tokenize needs the model's tokenizer");
  std::string text;
  int64_t line = 0, failed = 0;
  while (std::getline(std::cin, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json out;
    try {
      const nlohmann::json j = nlohmann::json::parse(text);
      DILU_USER_CHECK(j.is_object(), "expected a JSON object with \"text\", \"prompt\" or \"messages\"");
      std::vector<int32_t> ids;
      if (j.contains("text")) {
        DILU_USER_CHECK(j["text"].is_string(), "'text' must be a string");
        ids = encoder.encode_text(j["text"].get<std::string>());
      } else {
        Request r;
        r.line = line;
        if (j.contains("prompt")) {
          DILU_USER_CHECK(j["prompt"].is_string(), "'prompt' must be a string");
          r.kind = RequestKind::Completion;
          r.prompt_text = j["prompt"].get<std::string>();
        } else if (j.contains("messages")) {
          DILU_USER_CHECK(j["messages"].is_array(), "'messages' must be a list");
          r.kind = RequestKind::Chat;
          r.messages = j["messages"];
        } else {
          throw UserError("expected \"text\", \"prompt\" or \"messages\"");
        }
        ids = encoder.encode(r);
      }
      out = {{"token_ids", ids}, {"num_tokens", ids.size()}};
    } catch (const nlohmann::json::exception& e) {
      out = {{"error", {{"message", "line " + std::to_string(line) + ": not valid JSON (" + e.what() + ")"}, {"line", line}}}};
    } catch (const UserError& e) {
      out = {{"error", {{"message", "line " + std::to_string(line) + ": " + e.what()}, {"line", line}}}};
    }
    if (out.contains("error")) ++failed;
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  std::cout.flush();
  if (failed > 0) {
    std::cerr << "dilu tokenize: " << failed << " line(s) failed; see their error records\n";
    return 1;
  }
  return 0;
}

}  // namespace

void add_tokenize_command(CLI::App& root, Action& action) {
  auto model = std::make_shared<std::string>();
  CLI::App* cmd = root.add_subcommand(
      "tokenize",
      "Token ids of JSONL on stdin: {\"text\": ...} without special tokens, {\"prompt\": ...} or {\"messages\": "
      "[...]} exactly as 'dilu run' encodes them. Writes {\"token_ids\": [...], \"num_tokens\": n} per line.");
  cmd->add_option("--model", *model, "Checkpoint directory holding tokenizer.json and tokenizer_config.json")
      ->required();
  cmd->callback([model, &action] { action = [model] { return tokenize(*model); }; });
}

}  // namespace dilu::app
