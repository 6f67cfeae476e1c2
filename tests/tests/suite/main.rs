//! Every data-path and end-to-end test, in one binary (one link, one
//! harness; `cargo xtask test -- NAME` picks tests by name). Needs root.

mod admin_e2e;
mod bad_input;
mod conntrack;
mod consul_e2e;
mod consul_fake;
mod control_e2e;
mod datapath;
mod decap_datapath;
mod dr_e2e;
mod etcd_e2e;
mod etcd_watch;
mod fleet_e2e;
mod flood_e2e;
mod health_e2e;
mod hitless_e2e;
mod page_e2e;
mod restart_e2e;
mod second_chance_e2e;
mod systemd_e2e;
mod tun_datapath;
mod tun_e2e;
