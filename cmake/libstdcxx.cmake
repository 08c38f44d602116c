# libstdc++ must be the shared library the Python process already uses.
#
# A side-installed GCC whose library folder holds only libstdc++.a (seen on a CUDA build machine)
# silently links libstdc++'s stream and locale code into our shared library. Those copies carry
# their own std::locale::id objects, which disagree with the process's libstdc++: the first error
# message that formats a number (c10::str -> std::ostream::operator<<(long)) crashes the process.
#
# metalcore_use_shared_libstdcxx(target...) links the process's libstdc++.so.6 explicitly when the
# compiler would not find a shared one, and every target gets a post-link check that fails the
# build if libstdc++'s ostream code was copied in anyway.

set(METALCORE_LIBSTDCXX "" CACHE FILEPATH
    "Shared libstdc++ to link when the compiler finds only the static one (empty: ask Python)")

function(metalcore_use_shared_libstdcxx)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" OR NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    return()
  endif()
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.so
                  OUTPUT_VARIABLE _found OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(_lib "")
  if(NOT IS_ABSOLUTE "${_found}")
    # The compiler would take libstdc++.a. Use the libstdc++ that `import torch` maps.
    set(_lib "${METALCORE_LIBSTDCXX}")
    if(NOT _lib)
      execute_process(
        COMMAND ${Python_EXECUTABLE} -c
          "import torch\nfor line in open('/proc/self/maps'):\n    if 'libstdc++.so' in line:\n        print(line.split()[-1]); break"
        OUTPUT_VARIABLE _lib OUTPUT_STRIP_TRAILING_WHITESPACE)
    endif()
    if(NOT EXISTS "${_lib}")
      message(FATAL_ERROR "metalcore: ${CMAKE_CXX_COMPILER} finds only a static libstdc++ and no "
                          "shared one was found; set -DMETALCORE_LIBSTDCXX=/path/to/libstdc++.so.6")
    endif()
    message(STATUS "metalcore: ${CMAKE_CXX_COMPILER} has no shared libstdc++; linking ${_lib}")
  endif()
  foreach(target ${ARGN})
    if(_lib)
      target_link_libraries(${target} PRIVATE "${_lib}")
    endif()
    add_custom_command(TARGET ${target} POST_BUILD
      COMMAND ${CMAKE_COMMAND} -DLIB=$<TARGET_FILE:${target}> -DNM=${CMAKE_NM}
              -P ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/check_libstdcxx.cmake
      VERBATIM)
  endforeach()
endfunction()
