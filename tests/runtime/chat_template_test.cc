// Chat prompt formats: detection from the GGUF template source and the exact prompt text of each
// family (the strings the families' own templates render for a system + user + assistant + user
// conversation).
#include "runtime/chat_template.h"

#include <gtest/gtest.h>

namespace moe {
namespace {

const std::vector<ChatMessage> kConversation = {
    {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello."}, {"user", "Why?"}};

TEST(ChatTemplate, DetectsTheFamilies) {
  EXPECT_EQ(DetectChatFormat("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"),
            ChatFormat::kChatML);
  EXPECT_EQ(DetectChatFormat("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"),
            ChatFormat::kLlama3);
  EXPECT_EQ(DetectChatFormat("{{ '[INST] ' + content + ' [/INST]' }}"), ChatFormat::kMistral);
  EXPECT_EQ(DetectChatFormat("[INST] <<SYS>>\\n{{ system }}\\n<</SYS>>"), ChatFormat::kLlama2);
  EXPECT_EQ(DetectChatFormat("{{'<\xef\xbd\x9cUser\xef\xbd\x9c>' + message['content']}}"), ChatFormat::kDeepSeek3);
  EXPECT_EQ(DetectChatFormat("{{ 'User: ' + message['content'] + '\\n\\n' }}{{ 'Assistant:' }}"), ChatFormat::kDeepSeek2);
  EXPECT_EQ(DetectChatFormat(""), ChatFormat::kPlain);
  EXPECT_EQ(DetectChatFormat("{{ something else }}"), ChatFormat::kPlain);
}

TEST(ChatTemplate, FormatsEachFamily) {
  EXPECT_EQ(FormatChat(ChatFormat::kChatML, kConversation),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(FormatChat(ChatFormat::kLlama3, kConversation),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(FormatChat(ChatFormat::kLlama2, kConversation),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Why? [/INST]");
  EXPECT_EQ(FormatChat(ChatFormat::kMistral, kConversation), "[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Why? [/INST]");
  EXPECT_EQ(FormatChat(ChatFormat::kDeepSeek3, kConversation),
            "Be brief.<\xef\xbd\x9cUser\xef\xbd\x9c>Hi<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>Hello."
            "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c><\xef\xbd\x9cUser\xef\xbd\x9c>Why?"
            "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>");
  EXPECT_EQ(FormatChat(ChatFormat::kDeepSeek2, kConversation),
            "Be brief.\n\nUser: Hi\n\nAssistant: Hello.<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
            "User: Why?\n\nAssistant:");
  EXPECT_EQ(FormatChat(ChatFormat::kPlain, kConversation),
            "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Why?\nassistant:");
}

}  // namespace
}  // namespace moe
