//! Starts and cleans up the external processes that tests need: Python clients, etcd, moto.
