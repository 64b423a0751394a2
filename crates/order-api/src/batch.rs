//! Requests that arrive together share one round trip to Postgres.
//!
//! A request hands its item to a [`Batcher`] and waits for its answer. The
//! batcher takes every item waiting since it last looked, up to a maximum,
//! and runs them through its batch function together; it never waits to
//! fill a batch, so at low load a batch is one item. Several batches may run
//! at once; batches grow while they all are.

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Runs items through a batch function, whatever arrives together at once.
pub struct Batcher<T, R> {
    sender: mpsc::UnboundedSender<(T, oneshot::Sender<R>)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Start taking items: up to `max_batch` in a batch, `concurrent`
    /// batches at once. `run` answers a batch with one answer per item, in
    /// order. It stops once every handle is dropped.
    pub fn start<F, Fut>(concurrent: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(take(receiver, concurrent, max_batch, run));
        Self { sender }
    }

    /// `item`'s answer, once its batch has run; `None` if the batcher has
    /// stopped or its batch function panicked.
    pub async fn call(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.sender.send((item, reply)).ok()?;
        answer.await.ok()
    }
}

/// Take what is waiting, up to `max_batch`, whenever a batch may start.
async fn take<T, R, F, Fut>(
    mut receiver: mpsc::UnboundedReceiver<(T, oneshot::Sender<R>)>,
    concurrent: usize,
    max_batch: usize,
    run: F,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<R>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrent));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = receiver.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.into_iter().unzip();
        let answers = run(items);
        tokio::spawn(async move {
            for (reply, answer) in replies.into_iter().zip(answers.await) {
                let _ = reply.send(answer);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn answers_each_item_and_batches_what_waits() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let batcher = Batcher::start(1, 8, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                items.into_iter().map(|i| i * 10).collect::<Vec<_>>()
            }
        });
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (i, batcher.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.unwrap();
            assert_eq!(answer, Some(i * 10));
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(
            sizes.len() < 20,
            "one batch at a time: the rest wait together {sizes:?}"
        );
    }

    #[tokio::test]
    async fn one_item_alone_is_a_batch_of_one() {
        let batcher = Batcher::start(2, 8, |items: Vec<u32>| async move { items });
        assert_eq!(batcher.call(7).await, Some(7));
    }
}
