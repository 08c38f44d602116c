# Post-link check (see libstdcxx.cmake): fail if LIB defines libstdc++'s ostream insertion of long,
# the marker of a static libstdc++ copied into the library.
if(NOT NM)
  return()
endif()
execute_process(COMMAND ${NM} --defined-only ${LIB} OUTPUT_VARIABLE _syms RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  return()
endif()
string(FIND "${_syms}" " _ZNSo9_M_insertIlEERSoT_" _at)
if(NOT _at EQUAL -1)
  file(REMOVE ${LIB})
  message(FATAL_ERROR "${LIB} contains a static copy of libstdc++ (std::ostream::_M_insert<long>); "
                      "it would crash when formatting error messages. See cmake/libstdcxx.cmake.")
endif()
