# moe serve against the official OpenAI client (npm openai, third_party/npm), include()d from
# tests/CMakeLists.txt, where MOE_CLI is $<TARGET_FILE:moe>.
add_test(NAME serve COMMAND node ${CMAKE_SOURCE_DIR}/tests/serve/serve_test.mjs ${MOE_CLI})
set_tests_properties(serve PROPERTIES TIMEOUT 900)
