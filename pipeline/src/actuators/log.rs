//! The `log` driver: prints each command with its reason. What `ebb demo` uses, and a safe
//! first actuator for teams watching ebb beside their current autoscaler.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::{describe, ActuateError, Driver};
use crate::stages::decide::Command;

/// Where the log driver writes.
pub type Sink = Arc<Mutex<dyn Write + Send>>;

/// Prints one line per command to its sink (stdout by default) and logs it.
pub struct LogDriver {
    sink: Sink,
}

impl LogDriver {
    /// A driver printing to stdout.
    pub fn stdout() -> Self {
        Self::to(Arc::new(Mutex::new(std::io::stdout())))
    }

    /// A driver printing to `sink`.
    pub fn to(sink: Sink) -> Self {
        Self { sink }
    }
}

impl Driver for LogDriver {
    fn name(&self) -> &'static str {
        "log"
    }

    fn apply(&mut self, c: &Command) -> Result<String, ActuateError> {
        let what = describe(c);
        // The sink is the log a person reads; the trace line only joins it to the command id.
        tracing::debug!(command = %c.command_id, "{what}");
        if let Ok(mut sink) = self.sink.lock() {
            // A closed stdout must not stop the pipeline: the actuation record still says it.
            let _ = writeln!(
                sink,
                "{}  {what}  [{}] {}",
                c.decided_at, c.policy, c.reason
            );
        }
        Ok(format!("logged: {what}"))
    }
}
