//! The design wharf avoids: one actor hands out every worker. Checkout is a request to its
//! mailbox; checkin a message back; waiters queue inside the actor.

use std::collections::VecDeque;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Messages to the dispatcher.
pub enum DispatchMsg {
    /// Give me a worker (answered when one is free).
    Checkout(RpcReplyPort<usize>),
    /// I am done with this worker.
    Checkin(usize),
}

/// The dispatcher actor.
pub struct Dispatcher;

/// Its state: free workers and waiting callers.
pub struct DispatchState {
    free: Vec<usize>,
    waiting: VecDeque<RpcReplyPort<usize>>,
}

impl Actor for Dispatcher {
    type Msg = DispatchMsg;
    type State = DispatchState;
    type Arguments = usize;

    async fn pre_start(
        &self,
        _me: ActorRef<DispatchMsg>,
        n: usize,
    ) -> Result<DispatchState, ActorProcessingErr> {
        Ok(DispatchState {
            free: (0..n).collect(),
            waiting: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<DispatchMsg>,
        msg: DispatchMsg,
        st: &mut DispatchState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DispatchMsg::Checkout(reply) => match st.free.pop() {
                Some(w) => {
                    let _ = reply.send(w);
                }
                None => st.waiting.push_back(reply),
            },
            DispatchMsg::Checkin(w) => {
                let mut w = Some(w);
                while let Some(reply) = st.waiting.pop_front() {
                    match reply.send(w.take().expect("one worker to give")) {
                        Ok(()) => break,
                        // The waiter is gone: give the worker to the next one.
                        Err(ractor::MessagingErr::SendErr(back)) => w = Some(back),
                        Err(_) => break,
                    }
                }
                if let Some(w) = w {
                    st.free.push(w);
                }
            }
        }
        Ok(())
    }
}
