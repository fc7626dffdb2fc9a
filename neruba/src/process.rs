//! What a process has used, as Linux reports it (`/proc/<pid>/stat`): for reports that put a
//! process's cost beside what it did (`neruba loadgen`'s own CPU, the end-to-end benchmark's
//! CPU per event of each process).

use std::time::Duration;

/// Linux reports CPU time in clock ticks of `USER_HZ`, which is 100 on the architectures we
/// build for (x86-64, arm64; the kernel converts to it for `/proc`, whatever its own tick).
const TICK_MS: u64 = 10;

/// CPU time used by the process whose `/proc/<pid>/stat` line is `stat`: user and system, all
/// its threads, not its children's. `None` if the line is not such a line.
pub fn cpu_of(stat: &str) -> Option<Duration> {
    // The command name (field 2, in parentheses) may hold spaces and parentheses itself; the
    // fields after its last `)` are fixed: state is field 3, utime 14, stime 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        user.checked_add(system)?.checked_mul(TICK_MS)?,
    ))
}

/// CPU time the process `pid` has used (`"self"` for this one), user and system; `None` where
/// `/proc` cannot be read (not Linux, or the process is gone).
pub fn cpu(pid: &str) -> Option<Duration> {
    cpu_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as Linux writes it, for a process whose name holds `) ` and a number.
    const STAT: &str = "4242 (we) 1 2 (x) S 1 4242 4242 0 -1 4194560 5120 0 3 0 1234 56 7 8 20 0 \
                        9 0 777 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 \
                        0 0 0 0 0";

    #[test]
    fn user_and_system_ticks_after_the_name_are_the_cpu_time() {
        // utime 1234 and stime 56 ticks, not the children's 7 and 8.
        assert_eq!(cpu_of(STAT), Some(Duration::from_millis(12_900)));
    }

    #[test]
    fn a_line_that_is_not_a_stat_line_is_none() {
        assert_eq!(cpu_of(""), None);
        assert_eq!(cpu_of("4242 (short) S 1 2"), None);
        assert_eq!(cpu_of(&STAT.replace(" 1234 ", " -5 ")), None);
    }

    #[test]
    fn this_process_reads_the_cpu_it_burns() {
        // Linux only, as the project is. Spinning, the reading grows by a tick within a few
        // seconds however busy the machine (the 5 s bound only stops a reading that never moves).
        let before = cpu("self").expect("/proc/self/stat");
        let started = std::time::Instant::now();
        let mut spin = 0_u64;
        let after = loop {
            for _ in 0..100_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            let now = cpu("self").expect("/proc/self/stat");
            if now >= before + Duration::from_millis(10) || started.elapsed().as_secs() >= 5 {
                break now;
            }
        };
        assert!(
            after >= before + Duration::from_millis(10),
            "{before:?} → {after:?}"
        );
    }
}
