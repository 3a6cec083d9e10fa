//! Group commit: callers that arrive while a batch is running wait and go
//! together in the next one. A burst of signups becomes a few transactions
//! of many claims each instead of a hundred of one, and PostgreSQL's cost
//! per statement and per commit is paid once per batch. A lone caller runs
//! at once, as a batch of one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Semaphore};

type Waiting<T, R> = Vec<(T, oneshot::Sender<R>)>;

pub struct Batcher<T, R> {
    queue: Mutex<Waiting<T, R>>,
    /// How many batches may run at once.
    runs: Arc<Semaphore>,
    /// The most items one batch takes.
    max: usize,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    pub fn new(concurrent: usize, max: usize) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            runs: Arc::new(Semaphore::new(concurrent.max(1))),
            max: max.max(1),
        }
    }

    /// Runs `item` in a batch and returns its result. Whoever finds a free
    /// run takes every waiting item (up to the maximum) and starts `run` on
    /// them as a task of its own, so the batch finishes even if that caller
    /// goes away. `run` returns one result per item, in order. `None`: the
    /// batch ended without an answer for this item (it panicked, or gave
    /// too few results); the caller may go on alone.
    pub async fn submit<F, Fut>(&self, item: T, run: F) -> Option<R>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (tx, mut rx) = oneshot::channel();
        self.lock().push((item, tx));
        loop {
            tokio::select! {
                biased;
                got = &mut rx => return got.ok(),
                permit = self.runs.clone().acquire_owned() => {
                    let permit = permit.ok()?;
                    let (taken, batch): (usize, Waiting<T, R>) = {
                        let mut queue = self.lock();
                        let n = queue.len().min(self.max);
                        // A caller that went away (its request dropped)
                        // before its batch started gets nothing done.
                        (n, queue.drain(..n).filter(|(_, reply)| !reply.is_closed()).collect())
                    };
                    if taken == 0 {
                        // Another run took this item; it answers.
                        drop(permit);
                        return rx.await.ok();
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    let (items, replies): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
                    let running = run(items);
                    tokio::spawn(async move {
                        let results = running.await;
                        drop(permit);
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(result);
                        }
                    });
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting<T, R>> {
        // The queue holds plain data: a panic elsewhere leaves it whole.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `item` submitted from a task of its own.
    fn spawn_submit<R, F, Fut>(
        b: &Arc<Batcher<u32, R>>,
        item: u32,
        run: F,
    ) -> tokio::task::JoinHandle<Option<R>>
    where
        R: Send + 'static,
        F: Fn(Vec<u32>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let b = b.clone();
        tokio::spawn(async move { b.submit(item, run).await })
    }

    #[tokio::test]
    async fn a_lone_item_runs_at_once_as_a_batch_of_one() {
        let b = Batcher::<u32, u32>::new(1, 8);
        let got = b
            .submit(
                7,
                |items| async move { items.iter().map(|i| i * 2).collect() },
            )
            .await;
        assert_eq!(got, Some(14));
    }

    #[tokio::test]
    async fn items_arriving_while_a_batch_runs_go_together_in_the_next() {
        let b = Arc::new(Batcher::<u32, (u32, usize)>::new(1, 100));
        let batches = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let run = {
            let (batches, gate) = (batches.clone(), gate.clone());
            move |items: Vec<u32>| {
                let (batches, gate) = (batches.clone(), gate.clone());
                async move {
                    // The first batch holds until the others are queued.
                    if batches.fetch_add(1, Ordering::SeqCst) == 0 {
                        gate.notified().await;
                    }
                    let n = items.len();
                    items.into_iter().map(|i| (i, n)).collect()
                }
            }
        };
        let first = spawn_submit(&b, 0, run.clone());
        while batches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = (1..=5).map(|i| spawn_submit(&b, i, run.clone())).collect();
        while b.lock().len() < 5 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some((0, 1)));
        for (i, r) in rest.into_iter().enumerate() {
            assert_eq!(
                r.await.unwrap(),
                Some((i as u32 + 1, 5)),
                "one batch of five"
            );
        }
        assert_eq!(batches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_batch_takes_at_most_its_maximum() {
        let b = Arc::new(Batcher::<u32, usize>::new(1, 2));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let run = {
            let sizes = sizes.clone();
            move |items: Vec<u32>| {
                sizes.lock().unwrap().push(items.len());
                async move { vec![items.len(); items.len()] }
            }
        };
        let all = futures::future::join_all((0..5).map(|i| b.submit(i, run.clone()))).await;
        assert!(
            all.iter().all(|r| matches!(r, Some(n) if *n <= 2)),
            "{all:?}"
        );
        assert!(sizes.lock().unwrap().iter().all(|n| *n <= 2));
        assert_eq!(sizes.lock().unwrap().iter().sum::<usize>(), 5);
    }

    #[tokio::test]
    async fn an_item_whose_caller_went_away_before_its_batch_is_not_run() {
        let b = Arc::new(Batcher::<u32, u32>::new(1, 8));
        let ran = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let run = {
            let (ran, gate) = (ran.clone(), gate.clone());
            move |items: Vec<u32>| {
                let (ran, gate) = (ran.clone(), gate.clone());
                async move {
                    if items == [0] {
                        gate.notified().await;
                    }
                    ran.lock().unwrap().extend(items.iter().copied());
                    items
                }
            }
        };
        let first = spawn_submit(&b, 0, run.clone());
        while !b.lock().is_empty() || b.runs.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // Queued behind the running batch, then dropped.
        let gone = spawn_submit(&b, 1, run.clone());
        while b.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        let stays = spawn_submit(&b, 2, run.clone());
        while b.lock().len() < 2 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(first.await.unwrap(), Some(0));
        assert_eq!(stays.await.unwrap(), Some(2));
        assert_eq!(
            *ran.lock().unwrap(),
            vec![0, 2],
            "the dropped item never ran"
        );
    }

    #[tokio::test]
    async fn a_batch_that_answers_nothing_lets_its_callers_go_on_alone() {
        let b = Batcher::<u32, u32>::new(1, 8);
        let got = b.submit(1, |_| async { Vec::new() }).await;
        assert_eq!(got, None);
        // And the batcher still works afterwards.
        let got = b.submit(2, |items| async move { items }).await;
        assert_eq!(got, Some(2));
    }
}
