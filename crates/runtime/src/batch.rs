//! Taking work from a queue in batches: wait for the first item, then take
//! whatever else is already queued, until the batch is full. A busy consumer
//! gets large batches, an idle one handles each item at once.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The next batch of `queue`: its first item (waited for), then every item
/// already queued until `full` (called with each item taken) says the batch
/// is full. `None` at shutdown or when every sender is gone.
pub async fn next_batch<T>(
    queue: &mut mpsc::Receiver<T>,
    shutdown: &CancellationToken,
    mut full: impl FnMut(&T) -> bool,
) -> Option<Vec<T>> {
    let first = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        next = queue.recv() => next?,
    };
    let is_full = full(&first);
    let mut batch = vec![first];
    if !is_full {
        take_queued(queue, &mut batch, full);
    }
    Some(batch)
}

/// Adds to `batch` every item already queued until `full` (called with
/// each item taken) says the batch is full.
pub fn take_queued<T>(
    queue: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    mut full: impl FnMut(&T) -> bool,
) {
    while let Ok(next) = queue.try_recv() {
        let is_full = full(&next);
        batch.push(next);
        if is_full {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_until_full() -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::channel(16);
        for n in [3, 4, 5, 6] {
            tx.send(n).await?;
        }
        let shutdown = CancellationToken::new();
        let mut sum = 0;
        let batch = next_batch(&mut rx, &shutdown, |n| {
            sum += n;
            sum >= 7
        })
        .await;
        assert_eq!(batch, Some(vec![3, 4]));
        assert_eq!(
            next_batch(&mut rx, &shutdown, |_| false).await,
            Some(vec![5, 6])
        );
        drop(tx);
        assert_eq!(next_batch(&mut rx, &shutdown, |_| false).await, None);
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait_for_a_first_item() {
        let (_tx, mut rx) = mpsc::channel::<u8>(1);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert_eq!(next_batch(&mut rx, &shutdown, |_| false).await, None);
    }
}
