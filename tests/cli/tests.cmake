# The CLI contract: exit codes, one-line errors, JSON fields.
add_test(NAME cli COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/cli_test.py ${MOE_CLI})
set_tests_properties(cli PROPERTIES TIMEOUT 300)
