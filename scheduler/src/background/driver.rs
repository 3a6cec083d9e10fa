//! The one driver of the scheduler's background tasks. A task says what it
//! is called, how often it runs and which activator (`app::tasks`) runs it
//! sooner; the driver runs it on its own tokio task, once at start, then
//! at every period (measured from the start of a run; a run longer than
//! the period is followed by the next at once) or activation, until
//! shutdown. Every run's outcome, duration and time are recorded as
//! metrics, so an operator sees a task that stopped running or keeps
//! failing. A failed run is logged and the task runs again at its next
//! period.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::app::tasks::Activator;
use crate::error::Result;

/// A background task over the shared state `C` (the scheduler's `App`; a
/// small one in the driver's own tests).
pub trait Task<C: Send + Sync + 'static>: Send + 'static {
    /// Its name in logs and metrics (`task` label).
    const NAME: &'static str;

    /// How often it runs when nothing activates it.
    fn period(&self) -> Duration;

    /// The activator that runs it sooner, if any.
    fn activator(app: &C) -> Option<&Activator> {
        let _ = app;
        None
    }

    /// Called when the task is activated, before its run: a task may wait
    /// here (at most until its period ends) so that a burst of activations
    /// is served by one run.
    fn settle(&mut self, app: &Arc<C>) -> impl Future<Output = ()> + Send {
        let _ = app;
        async {}
    }

    /// One run.
    fn run_once(&mut self, app: &Arc<C>) -> impl Future<Output = Result<()>> + Send;

    /// Called once at shutdown, after the last run.
    fn stop(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// Runs tasks until shutdown.
pub struct Driver<C> {
    app: Arc<C>,
    shutdown: watch::Receiver<bool>,
    running: Vec<JoinHandle<()>>,
}

impl<C: Send + Sync + 'static> Driver<C> {
    pub fn new(app: Arc<C>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            app,
            shutdown,
            running: Vec::new(),
        }
    }

    /// Starts `task`: its first run is now.
    pub fn start<T: Task<C>>(&mut self, task: T) {
        let (app, shutdown) = (self.app.clone(), self.shutdown.clone());
        self.running.push(tokio::spawn(drive(app, task, shutdown)));
    }

    /// Waits for every task to finish its current run and stop (after
    /// shutdown).
    pub async fn join(self) {
        for handle in self.running {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "a background task panicked");
            }
        }
    }
}

/// Why a task runs now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    Period,
    Activation,
}

async fn drive<C, T>(app: Arc<C>, mut task: T, mut shutdown: watch::Receiver<bool>)
where
    C: Send + Sync + 'static,
    T: Task<C>,
{
    let mut tick = tokio::time::interval(task.period());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let cause = tokio::select! {
            _ = tick.tick() => Cause::Period,
            _ = activated::<C, T>(&app) => Cause::Activation,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        if cause == Cause::Activation {
            tokio::select! {
                _ = task.settle(&app) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        let started = Instant::now();
        let result = task.run_once(&app).await;
        record(T::NAME, cause, started.elapsed(), &result);
        if let Err(e) = result {
            tracing::warn!(task = T::NAME, error = %e, "background task run failed");
        }
    }
    task.stop().await;
}

/// The result of a run made of two independent passes (the second runs
/// whatever the first did): the first error, and the second logged when
/// both failed, so neither is lost.
pub fn both(task: &'static str, first: Result<()>, second: Result<()>) -> Result<()> {
    if let (Err(_), Err(e)) = (&first, &second) {
        tracing::warn!(task, error = %e, "background task's second pass failed too");
    }
    first.and(second)
}

/// Resolves when the task's activator fires; never for a task without one.
async fn activated<C: Send + Sync + 'static, T: Task<C>>(app: &C) {
    match T::activator(app) {
        Some(a) => a.activated().await,
        None => std::future::pending().await,
    }
}

fn record(task: &'static str, cause: Cause, took: Duration, result: &Result<()>) {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    let cause = match cause {
        Cause::Period => "period",
        Cause::Activation => "activation",
    };
    metrics::counter!("clawdeploy_background_runs_total", "task" => task, "result" => outcome, "cause" => cause)
        .increment(1);
    metrics::histogram!("clawdeploy_background_run_seconds", "task" => task)
        .record(took.as_secs_f64());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    metrics::gauge!("clawdeploy_background_last_run_timestamp_seconds", "task" => task).set(now);
    metrics::gauge!("clawdeploy_background_failing", "task" => task).set(if result.is_ok() {
        0.0
    } else {
        1.0
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::error::Error;

    /// The shared state of these tests: one activator, and what ran.
    #[derive(Default)]
    struct Ctx {
        wake: Activator,
        runs: AtomicUsize,
        settled: AtomicUsize,
        stopped: AtomicUsize,
        /// Runs that fail (by their number, from 1).
        failing: Mutex<Vec<usize>>,
    }

    struct Counting;

    impl Task<Ctx> for Counting {
        const NAME: &'static str = "counting";

        fn period(&self) -> Duration {
            Duration::from_secs(10)
        }

        fn activator(ctx: &Ctx) -> Option<&Activator> {
            Some(&ctx.wake)
        }

        async fn settle(&mut self, ctx: &Arc<Ctx>) {
            ctx.settled.fetch_add(1, Ordering::SeqCst);
        }

        async fn run_once(&mut self, ctx: &Arc<Ctx>) -> Result<()> {
            let n = ctx.runs.fetch_add(1, Ordering::SeqCst) + 1;
            if ctx.failing.lock().unwrap().contains(&n) {
                return Err(Error::Internal(format!("run {n} fails")));
            }
            Ok(())
        }
    }

    /// Lets the driver's task run until it waits again.
    async fn settle_tasks() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_runs_at_start_every_period_and_when_activated_and_stops_at_shutdown() {
        let ctx = Arc::new(Ctx::default());
        let (stop, shutdown) = watch::channel(false);
        let mut driver = Driver::new(ctx.clone(), shutdown);
        driver.start(Counting);
        settle_tasks().await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 1, "a first run at start");

        tokio::time::advance(Duration::from_secs(9)).await;
        settle_tasks().await;
        assert_eq!(
            ctx.runs.load(Ordering::SeqCst),
            1,
            "nothing before the period"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        settle_tasks().await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 2, "a run each period");

        // Activated: it runs now, after settling, not at the next period.
        ctx.wake.activate();
        settle_tasks().await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 3);
        assert_eq!(ctx.settled.load(Ordering::SeqCst), 1);
        // Three activations before it gets to run: one wakes it, the
        // other two coalesce into one more run.
        ctx.wake.activate();
        ctx.wake.activate();
        ctx.wake.activate();
        settle_tasks().await;
        settle_tasks().await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 5);

        stop.send(true).unwrap();
        driver.join().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 5, "no run after shutdown");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_followed_by_the_next_period_s_run() {
        let ctx = Arc::new(Ctx::default());
        ctx.failing.lock().unwrap().extend([1, 2]);
        let (stop, shutdown) = watch::channel(false);
        let mut driver = Driver::new(ctx.clone(), shutdown);
        driver.start(Counting);
        settle_tasks().await;
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 1);
        for expected in [2, 3, 4] {
            tokio::time::advance(Duration::from_secs(10)).await;
            settle_tasks().await;
            assert_eq!(ctx.runs.load(Ordering::SeqCst), expected);
        }
        stop.send(true).unwrap();
        driver.join().await;
    }

    /// A task with neither activator nor settling, stopping through a
    /// flag it shares with the test.
    struct Plain(Arc<Ctx>);

    impl Task<Ctx> for Plain {
        const NAME: &'static str = "plain";

        fn period(&self) -> Duration {
            Duration::from_secs(1)
        }

        async fn run_once(&mut self, ctx: &Arc<Ctx>) -> Result<()> {
            ctx.runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        async fn stop(self) {
            self.0.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_without_an_activator_runs_by_its_period_and_is_stopped_once() {
        let ctx = Arc::new(Ctx::default());
        let (stop, shutdown) = watch::channel(false);
        let mut driver = Driver::new(ctx.clone(), shutdown);
        driver.start(Plain(ctx.clone()));
        settle_tasks().await;
        ctx.wake.activate();
        settle_tasks().await;
        assert_eq!(
            ctx.runs.load(Ordering::SeqCst),
            1,
            "another task's activator"
        );
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            settle_tasks().await;
        }
        assert_eq!(ctx.runs.load(Ordering::SeqCst), 4);
        stop.send(true).unwrap();
        driver.join().await;
        assert_eq!(ctx.stopped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn of_two_passes_the_first_error_is_the_run_s() {
        let err = |m: &str| Err(Error::Internal(m.into()));
        assert!(both("t", Ok(()), Ok(())).is_ok());
        assert!(
            matches!(both("t", Ok(()), err("second")), Err(Error::Internal(m)) if m == "second")
        );
        assert!(
            matches!(both("t", err("first"), err("second")), Err(Error::Internal(m)) if m == "first")
        );
    }
}
