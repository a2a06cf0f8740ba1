#include "runtime/chat_template.h"

namespace moe {

namespace {
bool Has(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }
}  // namespace

ChatFormat DetectChatFormat(const std::string& t) {
  if (t.empty()) return ChatFormat::kPlain;
  if (Has(t, "<|im_start|>")) return ChatFormat::kChatML;
  if (Has(t, "<|start_header_id|>")) return ChatFormat::kLlama3;
  if (Has(t, "<\xef\xbd\x9cUser\xef\xbd\x9c>")) return ChatFormat::kDeepSeek3;  // <｜User｜>
  if (Has(t, "[INST]")) return Has(t, "<<SYS>>") ? ChatFormat::kLlama2 : ChatFormat::kMistral;
  if (Has(t, "User: ") && Has(t, "Assistant:")) return ChatFormat::kDeepSeek2;
  return ChatFormat::kPlain;
}

const char* ChatFormatName(ChatFormat f) {
  switch (f) {
    case ChatFormat::kChatML: return "chatml";
    case ChatFormat::kLlama3: return "llama3";
    case ChatFormat::kLlama2: return "llama2";
    case ChatFormat::kMistral: return "mistral";
    case ChatFormat::kDeepSeek2: return "deepseek2";
    case ChatFormat::kDeepSeek3: return "deepseek3";
    case ChatFormat::kPlain: return "plain";
  }
  return "plain";
}

std::string FormatChat(ChatFormat f, const std::vector<ChatMessage>& msgs) {
  std::string out, system;
  for (const ChatMessage& m : msgs)
    if (m.role == "system") system += (system.empty() ? "" : "\n\n") + m.content;
  switch (f) {
    case ChatFormat::kChatML:
      for (const ChatMessage& m : msgs) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      return out + "<|im_start|>assistant\n";
    case ChatFormat::kLlama3:
      for (const ChatMessage& m : msgs)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + m.content + "<|eot_id|>";
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::kLlama2: {  // the system prompt inside the first [INST]
      bool first = true;
      for (const ChatMessage& m : msgs) {
        if (m.role == "system") continue;
        if (m.role == "user") {
          out += "[INST] ";
          if (first && !system.empty()) out += "<<SYS>>\n" + system + "\n<</SYS>>\n\n";
          out += m.content + " [/INST]";
          first = false;
        } else {
          out += " " + m.content + " </s><s>";
        }
      }
      return out;
    }
    case ChatFormat::kMistral: {  // the system prompt before the first user message
      bool first = true;
      for (const ChatMessage& m : msgs) {
        if (m.role == "system") continue;
        if (m.role == "user") {
          out += "[INST] " + (first && !system.empty() ? system + "\n\n" : std::string()) + m.content + " [/INST]";
          first = false;
        } else {
          out += m.content + "</s>";
        }
      }
      return out;
    }
    case ChatFormat::kDeepSeek2:
      if (!system.empty()) out += system + "\n\n";
      for (const ChatMessage& m : msgs) {
        if (m.role == "user") out += "User: " + m.content + "\n\n";
        if (m.role == "assistant") out += "Assistant: " + m.content + "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";
      }
      return out + "Assistant:";
    case ChatFormat::kDeepSeek3:
      out += system;
      for (const ChatMessage& m : msgs) {
        if (m.role == "user") out += "<\xef\xbd\x9cUser\xef\xbd\x9c>" + m.content;
        if (m.role == "assistant")
          out += "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>" + m.content + "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";
      }
      return out + "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>";
    case ChatFormat::kPlain:
      for (const ChatMessage& m : msgs) out += m.role + ": " + m.content + "\n";
      return out + "assistant:";
  }
  return out;
}

}  // namespace moe
