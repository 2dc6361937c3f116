//! vm-tests harness library
