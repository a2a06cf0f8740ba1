// Chat prompts for `moe serve`'s /v1/chat/completions: the common families' formats, chosen by
// what the GGUF's tokenizer.chat_template (Jinja source, not executed) contains, with a plain
// "role: content" fallback for models without one.
#pragma once

#include <string>
#include <vector>

namespace moe {

enum class ChatFormat { kChatML, kLlama3, kLlama2, kMistral, kDeepSeek2, kDeepSeek3, kPlain };

struct ChatMessage {
  std::string role;  // system, user, assistant
  std::string content;
};

// The family of a chat template (the empty string: plain).
ChatFormat DetectChatFormat(const std::string& chat_template);
const char* ChatFormatName(ChatFormat f);

// The prompt text for messages, ending where the assistant's reply starts. Special-token text
// (<|im_start|>, [INST], ...) is meant to be tokenized as special tokens. The BOS token is not
// included (the tokenizer adds it as the model asks).
std::string FormatChat(ChatFormat f, const std::vector<ChatMessage>& messages);

}  // namespace moe
