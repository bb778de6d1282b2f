//! Pacing and progress for the rewrite: a rate limit, and a bar on a terminal (plain lines
//! every few seconds otherwise, for logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// At most `rate` calls a second, evenly spaced.
pub struct Pace {
    period: Duration,
    next: tokio::time::Instant,
}

impl Pace {
    pub fn new(rate: u32) -> Self {
        Pace {
            period: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))),
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits for the next slot.
    pub async fn wait(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next = self.next.max(tokio::time::Instant::now()) + self.period;
    }
}

/// Progress of one resource, on stderr.
pub struct Progress {
    what: String,
    total: u64,
    pub done: u64,
    started: Instant,
    last: Instant,
    terminal: bool,
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// `total` is what the scan expects to rewrite (a hint: objects come and go).
    pub fn new(what: &str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            total,
            done: 0,
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Counts one object and redraws when due.
    pub fn step(&mut self) {
        self.done += 1;
        let due = match self.terminal {
            true => self.last.elapsed() >= Duration::from_millis(100),
            false => self.last.elapsed() >= LINE_EVERY,
        };
        if due {
            self.draw();
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }

    fn draw(&mut self) {
        self.last = Instant::now();
        let mut err = std::io::stderr().lock();
        if self.terminal {
            const WIDTH: u64 = 30;
            let filled = (self.done.min(self.total) * WIDTH)
                .checked_div(self.total)
                .unwrap_or(WIDTH);
            let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
            let _ = write!(
                err,
                "\r  {} [{bar}] {}/{} {:.0}/s ",
                self.what,
                self.done,
                self.total,
                self.rate()
            );
        } else {
            let _ = writeln!(
                err,
                "kms-plugin migrate: {}: {}/{} rewritten, {:.0}/s",
                self.what,
                self.done,
                self.total,
                self.rate()
            );
        }
        let _ = err.flush();
    }

    /// Final state (ends the bar's line on a terminal).
    pub fn finish(mut self) {
        self.draw();
        if self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}
