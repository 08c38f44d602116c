# macOS: the Metal backend. Objective-C++ lives in csrc/mps/ only; the launch layer is the plain
# C++ that the Linux tests run through msim. Kernels: a metallib built here when the Metal
# compiler is installed (xcrun metal), else their sources are embedded and compiled at first use.
enable_language(OBJCXX)

# Every kernels/*.metal file is one translation unit of the kernel library (a new family's file
# is picked up without listing it here).
file(GLOB METALCORE_METAL_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/kernels/*.metal)
file(GLOB METALCORE_METAL_HEADERS CONFIGURE_DEPENDS
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/*.h ${CMAKE_CURRENT_SOURCE_DIR}/kernels/common/*.h)
set(METALCORE_GENERATED_DIR ${CMAKE_CURRENT_BINARY_DIR}/generated)
set(METALCORE_KERNELS_HEADER ${METALCORE_GENERATED_DIR}/metalcore_kernels.h)
set(METALCORE_EMBED ${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_metal.py)

# bfloat needs Metal 3.1 (macOS 14); no fast math: the kernels rely on IEEE inf/nan handling.
set(METALCORE_METAL_FLAGS -std=metal3.1 -mmacosx-version-min=14.0 -fno-fast-math -Wall -Wextra
    -I ${CMAKE_CURRENT_SOURCE_DIR}/kernels)

execute_process(COMMAND xcrun -sdk macosx metal --version
                RESULT_VARIABLE METALCORE_METAL_RC OUTPUT_QUIET ERROR_QUIET)
if(METALCORE_METAL_RC EQUAL 0)
  set(_airs)
  foreach(src ${METALCORE_METAL_SOURCES})
    get_filename_component(stem ${src} NAME_WE)
    set(air ${METALCORE_GENERATED_DIR}/${stem}.air)
    add_custom_command(
      OUTPUT ${air}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${METALCORE_GENERATED_DIR}
      COMMAND xcrun -sdk macosx metal ${METALCORE_METAL_FLAGS} -c ${src} -o ${air}
      DEPENDS ${src} ${METALCORE_METAL_HEADERS}
      COMMENT "metal ${stem}.metal"
      VERBATIM)
    list(APPEND _airs ${air})
  endforeach()
  set(METALCORE_METALLIB ${METALCORE_GENERATED_DIR}/metalcore.metallib)
  add_custom_command(
    OUTPUT ${METALCORE_METALLIB}
    COMMAND xcrun -sdk macosx metallib ${_airs} -o ${METALCORE_METALLIB}
    DEPENDS ${_airs}
    COMMENT "metallib metalcore.metallib"
    VERBATIM)
  add_custom_command(
    OUTPUT ${METALCORE_KERNELS_HEADER}
    COMMAND ${Python_EXECUTABLE} ${METALCORE_EMBED} metallib ${METALCORE_METALLIB}
            -o ${METALCORE_KERNELS_HEADER}
    DEPENDS ${METALCORE_METALLIB} ${METALCORE_EMBED}
    VERBATIM)
  message(STATUS "metalcore: Metal kernels precompiled into an embedded metallib")
else()
  add_custom_command(
    OUTPUT ${METALCORE_KERNELS_HEADER}
    COMMAND ${Python_EXECUTABLE} ${METALCORE_EMBED} source
            -I ${CMAKE_CURRENT_SOURCE_DIR}/kernels ${METALCORE_METAL_SOURCES}
            -o ${METALCORE_KERNELS_HEADER}
    DEPENDS ${METALCORE_METAL_SOURCES} ${METALCORE_METAL_HEADERS} ${METALCORE_EMBED}
    VERBATIM)
  message(STATUS "metalcore: no Metal compiler (xcrun metal); kernels are compiled from "
                 "embedded sources at first use")
endif()

# The launch layer registers each family's metalcore ops at the MPS key, on MetalEncoder
# (csrc/common/metal_registration.h); csrc/mps/ holds the Encoder itself.
file(GLOB METALCORE_MPS_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/mps/*.mm)
target_sources(metalcore_ops PRIVATE
  ${METALCORE_LAUNCH_SOURCES}
  ${METALCORE_MPS_SOURCES}
  ${METALCORE_KERNELS_HEADER})
target_compile_definitions(metalcore_ops PRIVATE METALCORE_METAL_MPS)
target_include_directories(metalcore_ops PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}
                                                 ${METALCORE_GENERATED_DIR})
# PyTorch's MPS headers are written for manual reference counting.
set_source_files_properties(${METALCORE_MPS_SOURCES} PROPERTIES COMPILE_OPTIONS "-fno-objc-arc")
target_link_libraries(metalcore_ops PRIVATE "-framework Foundation" "-framework Metal"
                      "-framework MetalPerformanceShaders" "-framework MetalPerformanceShadersGraph")
