//! `memory/peak_gib` on the CPU: the peak resident memory since the step began, in GiB. Alone
//! in its test binary (so in its own process), so no other test's memory is counted.

#![cfg(target_os = "linux")]

use candle_core::Device;
use grpo::memory::PeakMemory;

const MIB: usize = 1 << 20;

/// Touches every page of `bytes` of fresh memory, so it is resident.
fn resident(bytes: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; bytes];
    for page in buffer.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(buffer)
}

#[test]
fn the_peak_is_in_gib_and_starts_again_at_each_reset() {
    let mut memory = PeakMemory::new(&Device::Cpu);
    let baseline = memory.peak_gib().expect("Linux reports VmHWM");
    let buffer = resident(256 * MIB);
    let with_buffer = memory.peak_gib().unwrap();
    // 256 MiB is 0.25 GiB: a unit slip (bytes, KiB, MiB) is off by a factor of 1024 or more.
    let grown = with_buffer - baseline;
    assert!(
        (0.24..0.40).contains(&grown),
        "peak grew by {grown} GiB for 0.25 GiB touched (from {baseline} to {with_buffer})"
    );
    drop(buffer);
    memory.reset();
    let after_reset = memory.peak_gib().unwrap();
    assert!(
        after_reset < with_buffer - 0.2,
        "a reset starts a new peak: {after_reset} GiB after freeing, {with_buffer} before"
    );
}
